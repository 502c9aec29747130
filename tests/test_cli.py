"""The ``seethrough`` command line: argument parsing, and the demo end to end.

The demo runs as a user runs it (``python -m seethrough demo`` in a
subprocess) on SmolLM2 cut to 4 layers, and once on the full model, whose
logit lens must end with " Paris" on top (p ~ 0.77, see MODELS.md).
"""

from __future__ import annotations

import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seethrough import LanguageModel
from seethrough.cli import build_parser, main
from seethrough.interp.demo import DemoOptions, run_demo
from fixtures.signals import takes_ctrl_c

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("1. Activation statistics", "2. Logit lens", "3. Activation patching", "4. Steering")


def run_cli(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "seethrough", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (checks the signature too)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def lens_row(stdout: str, layer: int) -> str:
    """The logit lens table's row for ``layer``."""
    lens = stdout.split("2. Logit lens", 1)[1].split("3. Activation patching", 1)[0]
    rows = [line for line in lens.splitlines() if re.match(rf"\s*{layer}\s", line)]
    assert rows, f"no lens row for layer {layer} in:\n{lens}"
    return rows[0]


# -- parsing (fast) -------------------------------------------------------------------
def test_demo_options_and_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.model, args.layers, args.png, args.max_new_tokens, args.quiet) == (
        None, None, "seethrough-demo-patching.png", 24, False)
    args = build_parser().parse_args(
        ["demo", "--model", "x", "--layers", "4", "--png", "o.png", "--max-new-tokens", "3", "--quiet"])
    assert (args.model, args.layers, args.png, args.max_new_tokens, args.quiet) == ("x", 4, "o.png", 3, True)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_bad_option_values_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--layers", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error_without_traceback(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "no-such-model"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no-such-model" in err and "Traceback" not in err


def test_help_lists_demo_and_module_entry_point(tmp_path):
    done = run_cli("--help", cwd=tmp_path, timeout=120)
    assert done.returncode == 0
    assert "demo" in done.stdout


# -- the demo ---------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_on_four_layers_prints_tables_and_writes_png(tmp_path, smollm2_dir):
    png = tmp_path / "patching.png"
    done = run_cli("demo", "--layers", "4", "--png", str(png), "--max-new-tokens", "6", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for title in SECTIONS:
        assert title in out
    assert "4 layers" in out
    assert "unpatched clean" in out and "unpatched corrupted" in out
    assert "p(' Paris')" in out and "p(' Rome')" in out
    assert "before steering" in out and "after steering" in out
    assert re.search(r"^\s*3\s", lens_row(out, 3))
    assert f"heatmap written to {png.resolve()}" in out
    width, height = png_size(png)
    assert width > 100 and height > 100
    # progress bars go to stderr, never into the tables
    assert "patching" in done.stderr and "%|" in done.stderr
    assert "%|" not in out


@pytest.mark.slow
def test_demo_quiet_in_process_has_no_explanations(smollm2_small, tmp_path, capsys):
    hf, tokenizer = smollm2_small
    out = io.StringIO()
    png = run_demo(
        DemoOptions(png=str(tmp_path / "last.png"), max_new_tokens=3, quiet=True, last_position_only=True),
        out=out, model=LanguageModel(hf, tokenizer=tokenizer),
    )
    text = out.getvalue()
    for title in SECTIONS:
        assert title in text
    assert "What the model would predict" not in text
    assert "Over all" not in text  # one position only: no per-position summary
    assert "%|" not in capsys.readouterr().err
    png_size(png)


@pytest.mark.slow
def test_full_demo_lens_ends_with_paris(tmp_path, smollm2_dir):
    png = tmp_path / "full.png"
    done = run_cli("demo", "--png", str(png), "--last-position-only", "--max-new-tokens", "4", "--quiet",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "30 layers" in done.stdout
    last = lens_row(done.stdout, 29)
    match = re.match(r"\s*29\s+' Paris' (0\.\d+)", last)
    assert match, f"' Paris' is not top-1 at the last layer: {last!r}"
    assert float(match.group(1)) == pytest.approx(0.77, abs=0.03)
    png_size(png)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_command_hosts_a_model_for_remote_traces(tmp_path):
    """`python -m seethrough serve` is the server command; a remote trace through it
    equals the local one."""
    import json
    import urllib.request

    from seethrough import LanguageModel
    from seethrough.models.offline import save_random_gpt2
    from seethrough.remote.server.testing import free_port

    folder = save_random_gpt2(tmp_path / "gpt2", n_layer=2, n_embd=32, n_head=4, n_positions=64)
    port = free_port()
    server = subprocess.Popen(
        # Two torch threads: a request process forked from a multi-threaded model process
        # would hang at its first parallel operation (the worker loads on one thread).
        [sys.executable, "-m", "seethrough", "serve", "--model", f"tiny={folder}", "--port", str(port),
         "--threads", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=takes_ctrl_c,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/v1/health", timeout=2) as response:
                    if json.loads(response.read())["models"]["tiny"]["state"] == "idle":
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the server did not start")
        remote = LanguageModel("tiny", host=url)
        local = LanguageModel(str(folder))
        with remote.trace("Hello world", remote=True):
            got = remote.transformer.h[1].output.save()
        with local.trace("Hello world"):
            expected = local.transformer.h[1].output.save()
        assert torch.equal(got, expected)
        # Ctrl+C stops it with one line after uvicorn's "running on" line.
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
        after = output.split("(Press CTRL+C to quit)", 1)[1].strip().splitlines()
        assert after == ["seethrough serve: stopped"], output[-2000:]
        assert server.returncode == 0
    finally:
        server.kill()
        server.wait(timeout=30)


def test_serve_without_the_server_extra_names_the_extra(tmp_path):
    """As on a machine without `seethrough[server]`: uvicorn cannot be imported."""
    blocked = "import sys; sys.modules['uvicorn'] = None; sys.modules['fastapi'] = None\n"
    run = "from seethrough.cli import main; sys.exit(main(['serve', '--model', 'gpt2=/nowhere']))"
    done = subprocess.run([sys.executable, "-c", blocked + run], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "needs the `server` extra" in done.stderr and "pip install 'seethrough[server]'" in done.stderr


@pytest.mark.slow
def test_demo_quiet_converts_the_bundled_model_without_a_bar(tmp_path):
    """A first `--quiet` run (an empty cache: the bundled SmolLM2 is converted)
    shows no progress bar at all, the conversion's included."""
    env = {"SEETHROUGH_CACHE": str(tmp_path / "cache")}
    done = run_cli("demo", "--layers", "2", "--quiet", "--max-new-tokens", "2", "--png", str(tmp_path / "p.png"),
                   cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
    assert "converting" not in done.stderr and "%|" not in done.stderr, done.stderr
