"""Versions and family availability: `--version`, `arch list`, and the refusal of a family whose
code the installed transformers lacks (with the version to install), all without importing it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from compressor import versions
from compressor.architectures import ADAPTERS

from .conftest import run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_version_names_transformers_and_the_families_it_can_handle(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0, err
    assert f"transformers {importlib.metadata.version('transformers')}" in out
    handled = out.split("families this transformers can handle", 1)[1].splitlines()[0]
    for adapter in ADAPTERS:
        assert (adapter.family in handled) == versions.family_available(adapter), adapter.family


def test_version_and_arch_list_do_not_import_transformers():
    probe = (
        "import sys\nfrom compressor.cli import main\n"
        "codes = [main(['--version']), main(['arch', 'list'])]\n"
        "print('CODES', codes, 'HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "CODES [0, 0] HEAVY []" in done.stdout, done.stdout + done.stderr


def test_a_family_missing_from_this_transformers_is_refused_with_the_version_to_install(tiny_models, tmp_path, capsys, monkeypatch):
    # This transformers "lacks" Llama: its models folder is replaced by an empty one.
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setattr(versions, "_models_dir", lambda: empty)
    llama = next(a for a in ADAPTERS if a.family == "llama")
    assert not versions.family_available(llama)
    code, out, err = run_cli(capsys, "prune", tiny_models["llama"].path, "--recipe", RECIPES / "explicit.yaml", "-o", tmp_path / "out")
    assert code == 2
    assert "is a llama model (LlamaForCausalLM), whose code this transformers" in err
    assert f"pip install 'transformers{versions.SUPPORTED_TRANSFORMERS}'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    code, out, _ = run_cli(capsys, "arch", "list")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("llama "))
    assert f"no: needs transformers{versions.SUPPORTED_TRANSFORMERS}" in row


def test_a_family_with_a_minimum_names_it(monkeypatch):
    import dataclasses

    newer = dataclasses.replace(ADAPTERS[0], family="future", min_transformers="5.17", transformers_module="no_such_module")
    assert not versions.family_available(newer)
    assert versions.requirement(newer) == "transformers>=5.17,<6"


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a.family for a in ADAPTERS])
def test_every_adapter_names_a_module_this_transformers_may_have(adapter):
    """The availability check reads transformers/models/<module>: a wrong module name would
    refuse a family that loads. Families of 5.x only must say which release they need."""
    if versions.family_available(adapter):
        import transformers

        for name in adapter.architectures:
            assert hasattr(transformers, name), f"{adapter.family}: {name} is not in this transformers"
    else:
        assert adapter.min_transformers, f"{adapter.family} is unavailable here but names no minimum transformers"
