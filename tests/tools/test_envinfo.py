"""`distillkit env` lists the versions of the libraries distillkit plugs into, read from package metadata."""

from __future__ import annotations

from importlib import metadata

from distillkit.tools import envinfo


def test_integration_versions_come_from_the_installed_packages(capsys):
    versions = envinfo.integration_versions()
    assert set(versions) == set(envinfo.INTEGRATIONS)
    for name, version in versions.items():
        try:
            assert version == metadata.version(name), name
        except metadata.PackageNotFoundError:
            assert version == "not installed", name
    assert versions["transformers"] != "not installed"  # the [train] extra is part of the test setup
    assert envinfo.main([]) == 0
    out = capsys.readouterr().out
    assert "integrations:" in out and f"  transformers: {versions['transformers']}" in out
