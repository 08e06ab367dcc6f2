"""The persistent compilation cache: off unless asked for, on for the CLI and the tests."""

import os
import subprocess
import sys
import textwrap

import pytest

from hessspec import compilation_cache as cc

PROGRAM = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp
    before = jax.config.jax_compilation_cache_dir
    import hessspec as hs
    assert jax.config.jax_compilation_cache_dir == before, "import changed jax's config"
    folder = hs.enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None)
    print("folder", folder)
    from jax import monitoring
    saved = []
    SAVED = "/jax/compilation_cache/compile_time_saved_sec"
    monitoring.register_event_duration_secs_listener(
        lambda e, d, **k: saved.append(d) if e == SAVED else None
    )
    op = hs.as_operator(lambda v: jnp.arange(1.0, 41.0) * v, dim=40)
    res = hs.top_eigenpairs(op, 3)
    print("values", [round(float(x), 3) for x in res.values])
    print("loaded", len(saved))
    """
)


def _run(args, env=None):
    env = {**os.environ, **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_programs_are_stored_and_loaded_by_the_next_process(tmp_path):
    cache = tmp_path / "cache"
    first = _run([str(cache)])
    assert first["folder"] == str(cache.resolve())
    assert first["values"] == "[40.0, 39.0, 38.0]"
    stored = [p for p in cache.iterdir() if p.name.endswith("-cache")]
    assert any("engine" in p.name for p in stored)
    second = _run([str(cache)])
    assert second["values"] == first["values"]
    assert int(second["loaded"]) >= 1 and int(first["loaded"]) == 0


def test_environment_variable_chooses_or_switches_off(tmp_path, monkeypatch):
    monkeypatch.setenv(cc.ENV_VAR, "off")
    assert cc.cache_dir_from_env() is None
    assert cc.enable_compilation_cache() is None
    monkeypatch.setenv(cc.ENV_VAR, str(tmp_path / "elsewhere"))
    assert cc.cache_dir_from_env() == tmp_path / "elsewhere"
    monkeypatch.delenv(cc.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.default_cache_dir() == tmp_path / "xdg" / "hessspec" / "jax"
    out = _run([], env={cc.ENV_VAR: "0"})
    assert out["folder"] == "None"


def test_a_file_in_the_way_is_one_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        cc.enable_compilation_cache(blocker)
