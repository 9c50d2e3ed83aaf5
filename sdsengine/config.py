"""Typed, validated configurations: one dataclass per method, one for calibration.

The CLI builds its flags from these fields (see cli.py), so the two cannot drift. Adding a method is one
config class here and one registration in algorithms/__init__.py.
"""
import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass, field

import torch

DEVICE_KINDS = ("cpu", "cuda")
MATMUL = ("fp32", "tf32")  # SDS's iteration products (algorithms.least_squares.Objective)


def check_device_name(device):
    if str(device).split(":")[0] not in DEVICE_KINDS:
        raise ValueError(f"device must be cpu or cuda, got {device!r}")


_NUMBERS = {int: (numbers.Integral, "a whole number"), float: (numbers.Real, "a finite number")}

BLOCKWISE_LINEAR = ("--sequential linear applies to per-linear methods; {what} learns each decoder layer as a "
                    "whole: use --sequential layer")


def ignore_patterns(ignore) -> tuple:
    """Module-name patterns as a tuple: None is none, and one pattern given as a string is that pattern, not
    its characters (a lone "*" would keep everything dense)."""
    patterns = () if ignore is None else (ignore,) if isinstance(ignore, str) else tuple(ignore)
    if not all(isinstance(pattern, str) for pattern in patterns):
        raise ValueError(f"ignore must be module-name patterns (strings), got {ignore!r}")
    return patterns


def check_numbers(config):
    """Each int or float field of a config dataclass holds a number of that kind (None where the field allows
    it): a "64" or a 2.5 for a count fails here, naming the field, not deep inside a run."""
    for f in dataclasses.fields(config):
        kinds = [t for t in typing.get_args(f.type) or (f.type,) if t in _NUMBERS]
        value = getattr(config, f.name)
        if not kinds or (value is None and type(None) in typing.get_args(f.type)):
            continue
        kind, what = _NUMBERS[kinds[0]]
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            # NaN passes every `< 0` check and would silently disable what it sets (an L1 weight, a step)
            raise ValueError(f"{type(config).__name__}.{f.name} must be {what}, got {value!r}")


def check_device(device):
    """Raise, naming the problem, unless `device` (cpu, cuda, cuda:N) exists on this machine: before any
    model time, and instead of torch's assertion about how it was built."""
    check_device_name(device)
    kind, _, index = str(device).partition(":")
    if kind != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r}: no CUDA GPU is visible here (torch {torch.__version__}); "
                         "use --device cpu")
    if index and (not index.isdigit() or int(index) >= count):
        raise ValueError(f"device {device!r}: {count} CUDA GPU(s) visible here, cuda:0 to cuda:{count - 1}")


@dataclass(frozen=True)
class SparsityPattern:
    """Either an unstructured fraction of zeros (n = m = None) or N:M (n nonzeros kept per m inputs)."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text) -> "SparsityPattern":
        if isinstance(text, SparsityPattern):
            return text
        text = str(text).strip()
        if ":" in text:
            return cls._parse_nm(text)
        try:
            sparsity = float(text)
        except ValueError:
            raise ValueError(f"unknown sparsity pattern {text!r}: use a fraction like 0.5 or N:M like 2:4") from None
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        return cls(sparsity)

    @classmethod
    def _parse_nm(cls, text):
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(f"unknown sparsity pattern {text!r}: N:M needs two integers, like 2:4") from None
        if not 0 < n < m:
            raise ValueError(f"N:M pattern {text!r} needs 0 < N < M (N is the number of weights kept per M)")
        return cls(1.0 - n / m, n, m)

    @property
    def nm(self) -> tuple[int, int] | None:
        return (self.n, self.m) if self.n else None

    def __str__(self):
        return f"{self.n}:{self.m}" if self.n else f"{self.sparsity:g}"


@dataclass
class PruneConfig:
    """What every method shares. `ignore` holds fnmatch patterns of module names kept dense."""

    sparsity: str = field(default="2:4", metadata={"help": "fraction of zeros (0.5) or N:M (2:4, 4:8)"})
    ignore: tuple[str, ...] = field(default=(), metadata={"help": "module-name patterns to keep dense"})
    device: str = field(default="cpu", metadata={"help": "compute device for the current layer: cpu or cuda"})
    sequential: str | None = field(default=None, metadata={
        "help": "inputs each linear is pruned on: layer (every linear of a decoder layer sees the layer's "
                "unpruned forward; one pass, the SparseGPT/Wanda protocol) or linear (linears are pruned in "
                "forward order, each on inputs from the already-pruned ones before it; one partial pass "
                "more per group of linears that share an input). Default: layer; sds: linear, except with --base besa"})
    method = "base"

    def __post_init__(self):
        check_numbers(self)
        self.sparsity = SparsityPattern.parse(self.sparsity)
        self.ignore = ignore_patterns(self.ignore)
        check_device_name(self.device)  # a config only describes: availability is checked when it runs
        if self.sequential is None:
            self.sequential = self.default_sequential()
        if self.sequential not in ("layer", "linear"):
            raise ValueError(f"sequential must be layer or linear, got {self.sequential!r}")

    def default_sequential(self):
        return "layer"

    def to_dict(self):
        out = {"method": self.method}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        out["sparsity"] = str(self.sparsity)
        out["ignore"] = list(self.ignore)
        return out


@dataclass
class MagnitudeConfig(PruneConfig):
    method = "magnitude"


@dataclass
class WandaConfig(PruneConfig):
    method = "wanda"


@dataclass
class SparseGPTConfig(PruneConfig):
    blocksize: int = field(default=128, metadata={"help": "SparseGPT columns per lazy-update block (default 128)"})
    percdamp: float = field(default=0.01, metadata={
        "help": "Hessian dampening, fraction of its mean diagonal (default 0.01)"})
    refit: int = field(default=0, metadata={
        "help": "SparseGPT: conjugate-gradient steps of an exact least-squares refit of the kept weights on the "
                "final mask (0: off, the default; ours)"})
    swaps: int = field(default=0, metadata={
        "help": "SparseGPT, N:M patterns: sweeps of mask refinement after the refit, each group's kept weights "
                "re-chosen and re-solved exactly with the rest of the row fixed, then the refit again (0: off, "
                "the default; ours)"})
    method = "sparsegpt"

    def __post_init__(self):
        super().__post_init__()
        if self.swaps is None:
            self.swaps = self.default_swaps()
        if self.refit < 0:
            raise ValueError(f"refit must be >= 0 conjugate-gradient steps, got {self.refit}")
        if self.swaps < 0:
            raise ValueError(f"swaps must be >= 0 sweeps, got {self.swaps}")
        if self.swaps and not self.sparsity.nm:
            raise ValueError(f"swaps refine N:M masks group by group; the pattern {self.sparsity} is not N:M")
        if self.blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")
        if self.sparsity.m and self.blocksize % self.sparsity.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.sparsity.m}")
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")

    def default_swaps(self):
        return 0


@dataclass
class BESAConfig(PruneConfig):
    """BESA (arXiv 2402.16880): learn each row's (or layer's) sparsity under the block-output loss.

    Unstructured: the block's counted sparsity meets the target exactly; rows and layers inside it are free.
    N:M: every group keeps N, and what is learned is which N, by mixing candidate scores (docs/BESA.md).
    """

    mode: str = field(default="row", metadata={"help": "BESA: learn a sparsity per row or per layer (row, layer)"})
    epochs: int = field(default=1, metadata={"help": "BESA: passes over the calibration windows (0: Wanda)"})
    lr: float | None = field(default=None, metadata={
        "help": "BESA: learning rate; default: Prodigy 1.0, Adam 0.05 x batch for unstructured and 0.8 / steps for N:M "
                "(steps = epochs x windows / batch: 0.05 at 16 steps, 0.00625 at 128; docs/BESA.md)"})
    optimizer: str = field(default="adam", metadata={"help": "BESA: adam, or prodigy (needs prodigyopt)"})
    penalty: float = field(default=5.0, metadata={"help": "BESA: weight of the ((S - s*)/s*)^2 sparsity penalty"})
    candidates: int = field(default=100, metadata={"help": "BESA: rates k/candidates, k = 0..candidates"})
    smoothing: str = field(default="auto", metadata={
        "help": "BESA: sigmoid before the softmax over rates: on, off, auto (on for N:M and for sparsities in [0.4, 0.6]); "
                "on confines rates to about [0.38, 0.62]"})
    target: str = field(default="dense_block", metadata={
        "help": "BESA: the block's target: dense_block (the dense block on the pruned inputs) or dense_model "
                "(the dense model's block outputs; one more forward pass per layer)"})
    nm_scores: str = field(default="magnitude,channel", metadata={
        "help": "BESA N:M: what is mixed with Wanda's score and learned: magnitude, channel (comma list; at least "
                "one unless --epochs 0)"})
    nm_temperature: float = field(default=0.2, metadata={"help": "BESA N:M: temperature of the soft keep in backward"})
    nm_checks: int = field(default=16, metadata={
        "help": "BESA N:M: measure the hard-mask block loss on this many windows at the start and at steps 8, 16, "
                "32, ... and the last, and keep the lowest iterate (0: always the last)"})
    batch: int | None = field(default=None, metadata={
        "help": "BESA: calibration windows per learning step, their mean loss (default: 1; in a data-parallel "
                "group of P processes, P: one each; there a multiple of P)"})
    guard: str = field(default="layer", metadata={
        "help": "BESA: layer (a decoder layer whose output error Wanda's masks at the target make lower "
                "keeps those; one more forward pass per layer) or off (always the learned masks)"})
    method = "besa"

    NM_LR_TIMES_STEPS = 0.8  # N:M's default Adam step size times the step count (docs/BESA.md, "Step size")
    # sigmoid(θ) in (0, 1) confines each rate to about [0.376, 0.624]: smoothing is for targets well inside,
    # with room for the penalty to act
    SMOOTHING_MIN, SMOOTHING_MAX = 0.4, 0.6

    def __post_init__(self):
        super().__post_init__()
        self._check_choice("mode", ("row", "layer"))
        self._check_choice("optimizer", ("adam", "prodigy"))
        self._check_choice("smoothing", ("auto", "on", "off"))
        self._check_choice("target", ("dense_block", "dense_model"))
        self._check_choice("guard", ("layer", "off"))
        if (self.epochs < 0 or self.candidates < 2 or (self.lr is not None and self.lr <= 0) or self.penalty < 0
                or self.nm_temperature <= 0 or self.nm_checks < 0 or (self.batch is not None and self.batch < 1)):
            raise ValueError(f"besa needs epochs >= 0, candidates >= 2, lr > 0, penalty >= 0, nm_temperature > 0, "
                             f"nm_checks >= 0, batch >= 1; got {self.epochs}, {self.candidates}, {self.lr}, "
                             f"{self.penalty}, {self.nm_temperature}, {self.nm_checks}, {self.batch}")
        self.nm_scores = ",".join(s.strip() for s in str(self.nm_scores).split(",") if s.strip())
        unknown = set(self.nm_score_list) - {"magnitude", "channel"}
        if unknown:
            raise ValueError(f"unknown nm_scores {sorted(unknown)}; known: magnitude, channel")
        if self.sparsity.nm and self.epochs and not self.nm_score_list:
            raise ValueError("besa N:M with no nm_scores has nothing to learn: name at least one of magnitude, "
                             "channel (or --epochs 0 for Wanda's masks)")
        if self.smoothing == "on" and not (self.sparsity.nm or self._within_smoothing()):
            raise ValueError(f"sigmoid smoothing confines row sparsity to about [0.38, 0.62]; target "
                             f"{self.sparsity} (outside [{self.SMOOTHING_MIN}, {self.SMOOTHING_MAX}]) needs "
                             "--smoothing off (or auto)")
        if self.sequential == "linear":
            raise ValueError(BLOCKWISE_LINEAR.format(what="besa"))
        if not self.sparsity.nm and self.sparsity.sparsity == 0:
            raise ValueError("besa needs a sparsity above 0 (the penalty divides by the target)")

    def _check_choice(self, name, allowed, why=""):
        if getattr(self, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}{why}")

    def step_size(self, steps, batch=1) -> float:
        """The optimizer's learning rate for a block learned in `steps` steps of `batch` windows: --lr where given.
        Otherwise Prodigy's own 1.0; Adam 0.05 x batch for unstructured rates (fewer, averaged steps must travel as
        far: SmolLM2 at 50%, two processes' 8 steps of 2 windows gave 45.20 at 0.05 and 43.46 at 0.1, one process's
        16 steps 43.81 at 0.05; docs/BESA.md); for N:M, NM_LR_TIMES_STEPS / steps, since the hard-mask loss turns
        back up after a fixed amount of travel (0.05 is best at 16 steps, 0.00625 at 128)."""
        if self.lr is not None:
            return self.lr
        if self.optimizer == "prodigy":
            return 1.0
        return self.NM_LR_TIMES_STEPS / max(steps, 1) if self.sparsity.nm else 0.05 * batch

    @property
    def nm_score_list(self) -> tuple[str, ...]:
        return tuple(s for s in self.nm_scores.split(",") if s)

    @property
    def sigmoid(self) -> bool:
        """Whether rates go through the sigmoid: 'auto' turns it off where it could not reach the target."""
        if self.smoothing == "auto":
            return self.sparsity.nm is not None or self._within_smoothing()
        return self.smoothing == "on"

    def _within_smoothing(self):
        return self.SMOOTHING_MIN <= self.sparsity.sparsity <= self.SMOOTHING_MAX


@dataclass
class SDSConfig(SparseGPTConfig):
    """SDS, Sparse-Dense-Sparse (arXiv 2408.10473): base prune, re-dense, second prune, adjust.

    blocksize/percdamp serve the SparseGPT base. lr, iters, l1, l2 are the paper's values; solver,
    reduction, adjust and teacher are where the paper is silent (defaults measured: docs/SDS.md).
    """

    base: str = field(default="sparsegpt", metadata={
        "help": "SDS: the pruner of both S steps (sparsegpt, wanda), or besa: BESA's learned masks (its "
                "default settings), then SDS's reconstruction"})
    lr: float = field(default=0.1, metadata={"help": "SDS: step in units of 1/L (L: top eigenvalue of the loss), in (0, 1]"})
    iters: int = field(default=200, metadata={"help": "SDS: iterations of the re-dense and of the adjustment"})
    l1: float = field(default=0.1, metadata={"help": "SDS: L1 weight of the re-dense step"})
    l2: float = field(default=0.1, metadata={"help": "SDS: L2 (squared) weight of the re-dense step"})
    solver: str = field(default="fista", metadata={"help": "SDS re-dense solver: fista, ista, closed (needs l1=0)"})
    reduction: str = field(default="element", metadata={
        "help": "SDS: loss scale that l1/l2 are relative to: element (mean error per output, mean penalty "
                "per weight) or token (error summed over outputs, penalty summed over weights)"})
    adjust: str = field(default="on", metadata={"help": "SDS: weight adjustment after the second prune (on, off)"})
    refit: int = field(default=50, metadata={
        "help": "SDS: after the adjustment, on by default (50; 0: the paper's method)"})
    anchor: float = field(default=0.0, metadata={
        "help": "SDS: weight of a pull toward each step's start (W1 for the re-dense, W2 for the adjustment), "
                "in units of H's mean diagonal: limits moves where the calibration data says little"})
    teacher: str = field(default="sd", metadata={
        "help": "SDS: the teacher's inputs: sd (W_dense on the pruned model's inputs, the literal equation) "
                "or dense (W_dense on the dense model's inputs; one more forward pass per layer)"})
    swaps: int | None = field(default=None, metadata={
        "help": "SDS, N:M patterns: the same sweeps after SDS's refit (ours). Default: 1 on N:M patterns "
                "(measured on every base: docs/SDS.md), 0 off N:M"})
    matmul: str = field(default="fp32", metadata={
        "help": "SDS: precision of the re-dense and adjustment iterations' products with the Hessian: "
                "fp32, or tf32 (CUDA tensor cores, several times fp32's rate; on the CPU emulated by rounding "
                "the operands, so a CPU run shows a GPU run's quality); the steps' errors, the guard, the refit "
                "and the swaps stay fp32"})
    guard: str = field(default="layer", metadata={
        "help": "SDS: what falls back to the base's weights when SDS raises the calibration error: linear "
                "(each linear on its own output) or layer (then also the whole decoder layer on its output; "
                "one more forward pass per layer, two where the fallback is kept)"})
    method = "sds"

    def default_sequential(self):
        """Measured (docs/SDS.md): linear; BESA's masks are learned per whole layer, so not with base besa."""
        return "layer" if self.base == "besa" else "linear"

    def default_swaps(self):
        """Measured (docs/SDS.md, "Mask refinement"; docs/BESA.md): one sweep on N:M patterns from SparseGPT's
        masks (2:4 at two seeds, 4:8), Wanda's (2:4 at two seeds, 4:8) and BESA's (full protocol 0.902× at 2:4,
        0.929× at 4:8; reduced 0.911× and 0.865× at two seeds at 2:4, 0.905× at 4:8)."""
        return 1 if self.sparsity.nm else 0

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("base", ("sparsegpt", "wanda", "besa")), ("solver", ("fista", "ista", "closed")),
                              ("reduction", ("element", "token")), ("adjust", ("on", "off")), ("teacher", ("sd", "dense")),
                              ("guard", ("linear", "layer")), ("matmul", MATMUL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"sds {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 < self.lr <= 1.0:
            raise ValueError(f"sds lr is a fraction of the stable step 1/L and must be in (0, 1], got {self.lr}")
        if min(self.iters, self.l1, self.l2, self.anchor) < 0:
            raise ValueError(f"sds needs iters, l1, l2, anchor >= 0, got {self.iters}, {self.l1}, {self.l2}, "
                             f"{self.anchor}")
        if self.solver == "closed" and self.l1 > 0:
            raise ValueError(f"the closed-form re-dense solves L2 only: set --l1 0 or --solver fista (l1={self.l1})")
        if self.base == "besa":
            if self.sequential == "linear":
                raise ValueError(BLOCKWISE_LINEAR.format(what="sds --base besa (BESA's masks)"))
            self.besa_base()  # BESA's own limits (a sparsity above 0, say), checked now rather than mid-run

    def besa_base(self):
        """The BESA run of `--base besa`: BESA's defaults on this run's pattern, device and ignore list, its guard
        off, since SDS's guard (BESA's masked weights as the fallback) is the one the pipeline applies."""
        return BESAConfig(sparsity=str(self.sparsity), ignore=self.ignore, device=self.device, guard="off")

    def to_dict(self):
        """The recipe; with base besa also the BESA settings it ran, which are BESA's defaults of the day."""
        out = super().to_dict()
        if self.base == "besa":
            out["base_recipe"] = self.besa_base().to_dict()
        return out


@dataclass
class CalibrationConfig:
    """Calibration data: `dataset` is c4, wikitext2 or a path to a .txt/.jsonl file."""

    dataset: str = field(default="c4", metadata={"help": "c4 (the default), wikitext2, or a .txt/.jsonl path"})
    nsamples: int = field(default=128, metadata={"help": "number of calibration windows (default 128)"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per calibration window (default 2048)"})
    seed: int = field(default=0, metadata={"help": "seed of the window sampling (default 0)"})
    data_dir: str | None = field(default=None, metadata={"help": "offline data directory (env SDSENGINE_DATA_DIR)"})

    def __post_init__(self):
        check_numbers(self)
        if self.nsamples <= 0 or self.seqlen <= 1:
            raise ValueError(f"nsamples must be positive and seqlen at least 2 tokens, got {self.nsamples} and "
                             f"{self.seqlen}")

    def to_dict(self):
        return dataclasses.asdict(self)
