"""The command behind every quality number still asks today's CLI for what was run: each record's prune
command parses and builds the recorded method and calibration settings, so a default changed since the run
shows up here instead of in a user's unreproducible number (then write the flag into the record's command,
as `--guard off` was for the BESA runs made before the guard)."""
import json
import shlex
from pathlib import Path

import pytest

from sdsengine import cli

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
RECORDS = sorted(p for p in RESULTS.glob("quality*/*.json")
                 if not p.name.endswith(".prune.json") and "eval_command" in json.loads(p.read_text()))


def _args(command):
    words = shlex.split(command)
    assert words[0] == "sdsengine", command
    return cli.parse_args(words[1:])


def _differences(recipe, config, calibration_recorded, calibration):
    """Settings the record ran with that the command now sets otherwise. A None in today's config is a default
    resolved at run time (BESA's lr), and BESA's nm_* settings do nothing off N:M patterns: both skipped. A setting
    added since (not in the record) is not compared, inside a nested recipe (SDS's base_recipe) too."""
    differ = _differing(recipe, config.to_dict(), config.sparsity.nm is not None)
    today_calibration = calibration.to_dict()
    differ.update({f"calibration.{key}": (value, today_calibration[key])
                   for key, value in (calibration_recorded or {}).items()
                   if key in today_calibration and key != "data_dir" and today_calibration[key] != value})
    return differ


def _differing(recorded, today, nm, prefix=""):
    differ = {}
    for key, value in recorded.items():
        now = today.get(key)
        if now is None or (not nm and key.startswith("nm_")):
            continue
        if isinstance(value, dict) and isinstance(now, dict):
            differ.update(_differing(value, now, nm, f"{prefix}{key}."))
        elif now != value:
            differ[prefix + key] = (value, now)
    return differ


def test_the_records_are_found():
    assert len(RECORDS) > 50 and any(p.parent.name == "quality" for p in RECORDS)


@pytest.mark.parametrize("record", RECORDS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_recorded_command_still_runs_what_it_recorded(record):
    run = json.loads(record.read_text())
    for key in ("eval_command", "zeroshot_command"):
        if run.get(key):
            _args(run[key])
    if not run.get("prune_command"):
        return
    config, calibration = cli.prune_configs(_args(run["prune_command"]))
    report = json.loads(record.with_suffix(".prune.json").read_text())
    assert _differences(report["recipe"], config, report["calibration"], calibration) == {}


def test_a_changed_default_is_caught():
    """The check itself: a record whose run used another value than today's default is flagged."""
    config, calibration = cli.prune_configs(_args("sdsengine prune --method sds --sparsity 2:4 --out x"))
    recipe = {**config.to_dict(), "refit": 0}
    assert _differences(recipe, config, {"seed": 1}, calibration) == {"refit": (0, 50), "calibration.seed": (1, 0)}
    config, calibration = cli.prune_configs(_args("sdsengine prune --method sds --base besa --sparsity 2:4 --out x"))
    recipe = config.to_dict()
    recipe["base_recipe"] = {**recipe["base_recipe"], "epochs": 2}
    del recipe["base_recipe"]["batch"]  # a setting added since the record: not compared
    assert _differences(recipe, config, {}, calibration) == {"base_recipe.epochs": (2, 1)}
