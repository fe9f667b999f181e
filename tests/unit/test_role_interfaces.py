"""Every role's public interface: defaults/main.yml and meta/argument_specs.yml agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[2] / "collections/ansible_collections/cerana/platform/roles"
ALL = sorted(p.name for p in ROLES.iterdir() if (p / "meta/argument_specs.yml").is_file())


def load(role: str) -> tuple[dict, dict]:
    defaults = yaml.safe_load((ROLES / role / "defaults/main.yml").read_text()) or {}
    spec = yaml.safe_load((ROLES / role / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    return defaults, spec


def test_there_are_roles():
    assert {"consul", "node_tick"} <= set(ALL)


@pytest.mark.parametrize("role", ALL)
def test_defaults_and_argument_specs_name_the_same_variables(role):
    defaults, spec = load(role)
    assert set(defaults) == set(spec)
    assert all(name.startswith(f"{role}_") for name in defaults)


@pytest.mark.parametrize("role", ALL)
def test_documented_defaults_match(role):
    defaults, spec = load(role)
    for name, option in spec.items():
        assert option.get("description"), name
        if "default" in option:
            assert option["default"] == defaults[name], name
        else:  # computed defaults (templates) are documented in words
            assert "{{" in str(defaults[name]), name
