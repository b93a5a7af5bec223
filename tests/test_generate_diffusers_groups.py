"""The generator groups of conf/generator/: each composes (after any profile) to its model's
params, which the family and licence checks accept (SDXL-Turbo only with the opt-in)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml

from magicseg.core.config import parse_params
from magicseg.core.errors import ConfigError
from magicseg.generate.diffusers.families import (
    FAMILIES,
    LICENCES,
    check_family_options,
    check_licence,
)

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", "dpm++", 20, 7.5, 512),
    "sdxl-turbo": ("stabilityai/sdxl-turbo", "sdxl", "default", 4, 0.0, 512),
    "sd35-medium": ("stabilityai/stable-diffusion-3.5-medium", "sd3", "default", 40, 4.5, 1024),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "flux", "default", 4, 0.0, 1024),
    "flux2-klein": ("black-forest-labs/FLUX.2-klein-4B", "flux2", "default", 4, 0.0, 1024),
}


def compose(*overrides: str):
    """The params ``dvc exp run -S <override> ...`` composes (DVC's own Hydra composition)."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(ROOT / "conf"), None, "config", tmp, list(overrides))
        return parse_params(yaml.safe_load(out.read_text()))


def test_every_group_file_is_tested():
    assert sorted(p.stem for p in (ROOT / "conf/generator").glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("profile", ["offline", "magicseg"])
@pytest.mark.parametrize("group", sorted(EXPECTED))
def test_group_composes_to_its_models_params(group, profile):
    p = compose(f"profile={profile}", f"generator={group}")
    checkpoint, family, scheduler, steps, guidance, size = EXPECTED[group]
    d = p.generate.diffusers
    assert p.profile == profile and p.generate.backend == "diffusers"
    assert (d.checkpoint, d.family, d.scheduler, d.steps, d.guidance) == (
        checkpoint,
        family,
        scheduler,
        steps,
        guidance,
    )
    assert (p.generate.height, p.generate.width) == (size, size)
    assert not d.accept_noncommercial  # a group never accepts a licence for you
    # the profile's other choices survive (magicseg: shared noise, png)
    assert d.pair_noise == "shared" and p.generate.image_format == "png"
    # every option the group leaves to the profile is one its family honours
    check_family_options(d, FAMILIES[family])
    assert size % 16 == 0


@pytest.mark.parametrize("group", sorted(EXPECTED))
def test_group_with_the_paper_profile_is_still_honoured(group):
    """The paper profile sets the safety checker and independent noise: a group on top of it
    turns off what its family has no use for, so the family checks pass."""
    d = compose("profile=paper", f"generator={group}").generate.diffusers
    check_family_options(d, FAMILIES[EXPECTED[group][1]])
    assert d.pair_noise == "independent"  # the profile's, untouched


def test_licences_noncommercial_groups_need_the_opt_in():
    for group, (checkpoint, *_rest) in EXPECTED.items():
        d = compose(f"generator={group}").generate.diffusers
        if group == "sdxl-turbo":
            with pytest.raises(ConfigError, match=r"^generate\.diffusers\.accept_noncommercial"):
                check_licence(d, LICENCES[checkpoint])
        else:
            check_licence(d, LICENCES[checkpoint])
    d = compose("generator=sdxl-turbo", "generate.diffusers.accept_noncommercial=true")
    check_licence(d.generate.diffusers, LICENCES["stabilityai/sdxl-turbo"])


def test_without_a_group_the_default_params_are_unchanged():
    assert compose().generate == compose("profile=offline").generate
    assert compose().generate.backend == "procedural"
