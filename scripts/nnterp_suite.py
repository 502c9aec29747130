"""nnterp's own test suite, on seethrough (through the stand-in) and on real nnsight.

nnterp ships its tests inside its wheel (``nnterp/tests``).  This script runs
them, unchanged, on local model folders named like the hub ids nnterp's test
lists use (so its llama-like tests and its per-architecture branches apply),
offline, and counts passed / failed / skipped / errors per model::

    # 1. build the model folders (seethrough's environment: it has the offline tokenizers)
    PYTHONPATH=src .venv/bin/python scripts/nnterp_suite.py build /tmp/nnterp-suite
    # 2. run the suite on seethrough, then on real nnsight (a separate environment)
    PYTHONPATH=src .venv/bin/python scripts/nnterp_suite.py run /tmp/nnterp-suite --backend seethrough
    /work/nnsight-venv/bin/python scripts/nnterp_suite.py run /tmp/nnterp-suite --backend nnsight
    # or all of it, with a table (one column per environment)
    PYTHONPATH=src .venv/bin/python scripts/nnterp_suite.py compare /tmp/nnterp-suite \\
        --nnsight-python /work/nnsight-venv/bin/python --nnsight-python /work/nnsight07-venv/bin/python

Models (``build``): tiny random Llama, Qwen2, GPT-2, Bloom, OPT and GPT-NeoX
(two layers, width 32, the real GPT-2 tokenizer; seed 0) and the offline
SmolLM2-135M-Instruct (``--no-smollm2`` leaves it out).  ``run`` works from
that folder, with ``HF_HUB_OFFLINE=1``, one torch thread, and only what the
suite needs from outside: nnterp's test utilities read and write a status
file in the package ``nnterp.data``, which the wheel does not ship, so a
folder holding it is added to ``nnterp.__path__`` (nnterp itself is not
edited), pre-filled so that no hub listing is fetched; each model's
availability is then checked by the suite's own code.  The counts go to
``<folder>/results-<label>.json`` (``seethrough`` or ``nnsight-<version>``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# hub-like name -> tiny family (seethrough.models.offline.TINY_CONFIGS) or "smollm2"
MODELS: dict[str, str] = {
    "yujiepan/llama-2-tiny-random": "llama",        # on nnterp's llama-like list
    "yujiepan/qwen2-tiny-random": "qwen2",          # on nnterp's llama-like list
    "gpt2": "gpt2",                                 # nnterp's tests branch on this name
    "bigscience/bigscience-small-testing": "bloom",  # and on this one
    "yujiepan/opt-tiny-2layers-random": "opt",
    "local/gpt-neox-tiny-random": "gpt_neox",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2",
}
TEST_FILES = ("test_model_renaming.py", "test_nnsight_utils.py", "test_interventions.py",
              "test_probabilities.py", "test_prompt_utils.py")


def build(folder: Path, smollm2: bool) -> None:
    """Save the model folders under ``folder`` (run where seethrough is importable)."""
    import torch

    from seethrough.models import offline

    torch.set_num_threads(1)
    for name, family in MODELS.items():
        target = folder / name
        if family == "smollm2":
            if not smollm2:
                continue
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(offline.smollm2_dir(), target_is_directory=True)
        elif not (target / "model.safetensors").exists():
            offline.save_random_lm(target, family)
        print(f"built {name} ({family})")


class _XdistHookSpecs:
    """nnterp's conftest implements pytest-xdist's ``pytest_testnodedown`` hook;
    without pytest-xdist installed pytest refuses an unknown hook, so its spec
    is declared here (the suite runs in one process: the hook never fires)."""

    import pluggy

    @pluggy.HookspecMarker("pytest")
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """A worker node finished (pytest-xdist)."""


class _Counts:
    """A pytest plugin counting outcomes per model parameter."""

    def pytest_addhooks(self, pluginmanager: Any) -> None:
        if not pluginmanager.has_plugin("xdist"):
            pluginmanager.add_hookspecs(_XdistHookSpecs)

    def __init__(self) -> None:
        self.per_model: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.failures: dict[str, list[str]] = defaultdict(list)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            model = _model_of(report)
            if report.when == "setup" and report.skipped:
                outcome = "skipped"
            elif report.when == "setup":
                outcome = "error"
            else:
                outcome = report.outcome  # passed / failed / skipped
            self.per_model[model][outcome] += 1
            if outcome in ("failed", "error"):
                crash = getattr(report.longrepr, "reprcrash", None)
                line = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1:]
                self.failures[model].append(f"{report.nodeid.split('::')[-1]}: {str(line)[:400]}")

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self.per_model["(collection)"]["error"] += 1
            text = str(report.longrepr).strip().splitlines()
            self.failures["(collection)"].append(f"{report.nodeid}: {text[-1][:300] if text else ''}")


def _model_of(report: Any) -> str:
    name = report.nodeid.split("::")[-1]
    if "[" in name:
        return name[name.index("[") + 1: name.rindex("]")]
    return "(no model)"


def run(folder: Path, backend: str, models: list[str], extra: list[str], label: str | None = None) -> dict:
    """Run nnterp's tests on ``models`` (folders under ``folder``) with ``backend``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    if backend == "seethrough":
        import seethrough.stand_in  # noqa: F401 - the switch: `import nnsight` gives seethrough from here on
    import importlib.util

    import pytest
    import transformers

    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    label = label or (backend if backend == "seethrough" else f"nnsight-{_dist_version('nnsight')}")
    extra_dir = _status_package(folder, label, backend, versions)
    tests = Path(importlib.util.find_spec("nnterp").submodule_search_locations[0]) / "tests"
    counts = _Counts()
    os.chdir(folder)  # model names are folders here, spelled like hub ids
    try:
        import nnterp

        nnterp.__path__.append(str(extra_dir))  # `nnterp.data`, which the wheel lacks
        import nnsight

        versions["nnsight"] = nnsight.__version__
        versions["nnterp"] = getattr(nnterp, "__version__", _dist_version("nnterp"))
    except ImportError as error:  # nnterp cannot even be imported on this nnsight
        versions["import_error"] = f"{type(error).__name__}: {error}"
    args = [str(tests / f) for f in TEST_FILES] + ["--model-names", *models, "-p", "no:cacheprovider", "-q",
                                                      "-p", "no:randomly", *extra]
    started = time.time()
    code = pytest.main(args, plugins=[counts])
    if not counts.per_model and code != 0:  # the suite did not start (e.g. nnterp cannot import this nnsight)
        counts.per_model["(suite did not start)"]["error"] += 1
        counts.failures["(suite did not start)"].append(versions.get("import_error", f"pytest exit code {int(code)}"))
    result = {"backend": backend, "label": label, "versions": versions, "exit_code": int(code),
              "seconds": round(time.time() - started, 1), "models": models,
              "counts": {m: dict(c) for m, c in sorted(counts.per_model.items())},
              "failures": {m: f for m, f in sorted(counts.failures.items())},
              "command": " ".join([sys.executable, *sys.argv])}
    out = folder / f"results-{label}.json"
    out.write_text(json.dumps(result, indent=2))
    _print_counts(result)
    print(f"written: {out}")
    return result


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _status_package(folder: Path, label: str, backend: str, versions: dict) -> Path:
    """A folder with ``data/__init__.py`` and ``data/test_loading_status.json``,
    whose status names the running transformers and nnsight versions (so the
    suite checks each model itself instead of fetching a hub collection)."""
    extra_dir = folder / f"_nnterp_extra_{label}"
    shutil.rmtree(extra_dir, ignore_errors=True)
    (extra_dir / "data").mkdir(parents=True)
    (extra_dir / "data" / "__init__.py").write_text("")
    nnsight_version = _nnsight_version(backend)
    status = {versions["transformers"]: {nnsight_version: {}}}
    (extra_dir / "data" / "test_loading_status.json").write_text(json.dumps(status))
    return extra_dir


def _nnsight_version(backend: str) -> str:
    if backend == "seethrough":
        from seethrough.nnsight import __version__

        return __version__
    return _dist_version("nnsight")


def _print_counts(result: dict) -> None:
    print(f"\n{result['label']}: {json.dumps(result['versions'])}")
    for model, counts in result["counts"].items():
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"  {model:40s} {shown}")


def compare(folder: Path, nnsight_pythons: list[str], models: list[str], smollm2: bool) -> None:
    """Build the models, run the suite on seethrough and on each nnsight
    environment, and print the counts side by side."""
    here = Path(__file__).resolve()
    build(folder, smollm2)
    runs = [("seethrough", sys.executable)] + [("nnsight", python) for python in nnsight_pythons]
    labels = []
    for backend, python in runs:
        env = dict(os.environ)
        if backend == "nnsight":
            env.pop("PYTHONPATH", None)  # that environment must not see seethrough
            version = subprocess.run([python, "-c", "from importlib.metadata import version; print(version('nnsight'))"],
                                     env=env, capture_output=True, text=True, check=True).stdout.strip()
            label = f"nnsight-{version}"
        else:
            label = "seethrough"
        labels.append(label)
        subprocess.run([python, str(here), "run", str(folder), "--backend", backend, "--label", label,
                        "--models", *models], env=env, check=False)
    results = {label: json.loads((folder / f"results-{label}.json").read_text()) for label in labels}
    print("\ncounts as passed/failed/skipped/errors")
    print(f"{'model':42s}" + "".join(f"{label:>24s}" for label in labels))
    names = sorted({m for r in results.values() for m in r["counts"]})
    for model in names:
        cells = []
        for label in labels:
            c = results[label]["counts"].get(model, {})
            cells.append(f"{c.get('passed', 0)}/{c.get('failed', 0)}/{c.get('skipped', 0)}/{c.get('error', 0)}")
        print(f"{model:42s}" + "".join(f"{cell:>24s}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build")
    p_build.add_argument("folder", type=Path)
    p_build.add_argument("--no-smollm2", action="store_true")
    p_run = sub.add_parser("run")
    p_run.add_argument("folder", type=Path)
    p_run.add_argument("--backend", choices=("seethrough", "nnsight"), required=True)
    p_run.add_argument("--label", default=None, help="results-<label>.json (default: the backend)")
    p_run.add_argument("--models", nargs="+", default=None)
    p_cmp = sub.add_parser("compare")
    p_cmp.add_argument("folder", type=Path)
    p_cmp.add_argument("--nnsight-python", action="append", required=True,
                       help="python of an environment with nnsight and nnterp (repeat for several)")
    p_cmp.add_argument("--models", nargs="+", default=None)
    p_cmp.add_argument("--no-smollm2", action="store_true")
    argv = sys.argv[1:]
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []  # `run ... -- -x -k lens`
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    folder = args.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if args.command == "build":
        build(folder, not args.no_smollm2)
        return
    smollm2 = not getattr(args, "no_smollm2", False)
    models = args.models or [m for m, f in MODELS.items() if f != "smollm2" or smollm2]
    if args.command == "run":
        run(folder, args.backend, [m for m in models if (folder / m).exists()], pytest_args, args.label)
    else:
        compare(folder, args.nnsight_python, models, smollm2)


if __name__ == "__main__":
    main()
