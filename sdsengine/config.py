"""Typed, validated configurations: one dataclass per method, one for calibration.

The CLI builds its flags from these fields (see cli.py), so the two cannot drift. Adding a method is one
config class here and one registration in algorithms/__init__.py.
"""
import dataclasses
from dataclasses import dataclass, field


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
    method = "base"

    def __post_init__(self):
        self.sparsity = SparsityPattern.parse(self.sparsity)
        self.ignore = tuple(self.ignore)
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")

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
    blocksize: int = field(default=128, metadata={"help": "SparseGPT columns per lazy-update block"})
    percdamp: float = field(default=0.01, metadata={"help": "Hessian dampening, fraction of its mean diagonal"})
    method = "sparsegpt"

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")
        if self.sparsity.m and self.blocksize % self.sparsity.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.sparsity.m}")
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")


@dataclass
class CalibrationConfig:
    """Calibration data: `dataset` is c4, wikitext2 or a path to a .txt/.jsonl file."""

    dataset: str = field(default="c4", metadata={"help": "c4, wikitext2, or a .txt/.jsonl path"})
    nsamples: int = field(default=128, metadata={"help": "number of calibration windows"})
    seqlen: int = field(default=2048, metadata={"help": "tokens per calibration window"})
    seed: int = field(default=0, metadata={"help": "seed of the window sampling"})
    data_dir: str | None = field(default=None, metadata={"help": "offline data directory (env SDSENGINE_DATA_DIR)"})

    def __post_init__(self):
        if self.nsamples <= 0 or self.seqlen <= 1:
            raise ValueError(f"nsamples and seqlen must be positive, got {self.nsamples} and {self.seqlen}")

    def to_dict(self):
        return dataclasses.asdict(self)
