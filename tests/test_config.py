import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from magicseg.core.config import RENAMED, Params, load_params, params_reference, parse_params
from magicseg.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_validate_and_cover_every_field():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every field is written out, so DVC tracks every value (no hidden defaults)
    assert raw == params.model_dump(mode="json")


def test_params_yaml_is_the_composed_offline_profile(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), [])
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((ROOT / "params.yaml").read_text())


LABELERS = {
    "grounded-sam": ("grounded_sam", "IDEA-Research/grounding-dino-tiny", "facebook/sam-vit-huge"),
    "mm-gdino-sam21": (
        "grounded_sam",
        "openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det",
        "facebook/sam2.1-hiera-large",
    ),
    "llmdet-sam21": ("grounded_sam", "iSEE-Laboratory/llmdet_tiny", "facebook/sam2.1-hiera-large"),
    "sam3": ("sam3", "facebook/sam3", None),
}


@pytest.mark.parametrize("labeler", sorted(LABELERS))
def test_labeler_groups_compose_over_a_profile(tmp_path, labeler):
    """``-S profile=magicseg -S labeler=<name>``: the labeler's keys, the profile's others."""
    from dvc.utils.hydra import compose_and_dump

    assert sorted(p.stem for p in (ROOT / "conf/labeler").glob("*.yaml")) == sorted(LABELERS)
    out = tmp_path / "params.yaml"
    overrides = ["profile=magicseg", f"labeler={labeler}"]
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), overrides)
    p = load_params(out)
    backend, first, second = LABELERS[labeler]
    assert p.label.backend == backend
    if backend == "sam3":
        assert p.label.sam3.checkpoint == first
        assert p.label.sam3.accept_licence is False  # the opt-in stays the user's
    else:
        assert (p.label.grounded_sam.detector_checkpoint, p.label.grounded_sam.sam_checkpoint) == (
            first,
            second,
        )
    # the profile is kept: the magicseg profile's own values
    assert p.profile == "magicseg" and p.filter.min_score == 0.3 and p.generate.height == 512


def test_an_unknown_labeler_group_is_refused(tmp_path):
    """Not ``optional`` in the defaults list: an optional group ignores a misspelt option."""
    from dvc.utils.hydra import compose_and_dump

    with pytest.raises(Exception, match="labeler/sam4"):
        compose_and_dump(
            tmp_path / "p.yaml", str(ROOT / "conf"), None, "config", str(tmp_path), ["labeler=sam4"]
        )


def test_paper_profile_composes_to_the_papers_setting(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), ["profile=paper"])
    p = load_params(out)
    assert p.profile == "paper"
    assert (p.vocabulary.source, p.generate.backend, p.label.backend) == (
        "lvis",
        "diffusers",
        "grounded_sam",
    )
    assert (p.generate.height, p.generate.diffusers.steps, p.generate.diffusers.guidance) == (
        512,
        20,
        7.5,
    )
    assert (p.train.architecture, p.train.steps, p.train.batch_size, p.train.num_sampled) == (
        "clip",
        20000,
        16,
        100,
    )
    assert p.train.cf_weight == 1.0


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"train": {"num_sampeld": 5}}, "train.num_sampeld: unknown key (allowed: "),
        ({"bogus": 1}, "bogus: unknown key (allowed: evaluate, filter"),
        (
            {"train": {"num_sampled": 0}},
            "train.num_sampled: Input should be greater than or equal to 1 (got 0)",
        ),
        ({"train": {"num_sampled": "many"}}, "train.num_sampled: Input should be a valid integer"),
        (
            {"generate": {"backend": "dalle"}},
            "generate.backend: Input should be 'procedural' or 'diffusers'",
        ),
        ({"vocabulary": {"source": "file"}}, "vocabulary.file: required when source is 'file'"),
        ({"filter": {"min_area": 0.5, "max_area": 0.4}}, "filter.min_area: must be < max_area"),
        (
            {"generate": {"backend": "diffusers", "height": 500}},
            "generate.height: must be a multiple of 8",
        ),
        (
            {"prompts": {"openai": {"temperature": 3}}},
            "prompts.openai.temperature: Input should be less than or equal to 2",
        ),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(data, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("params.yaml: ")
    assert expected in msg


def test_params_are_frozen():
    p = Params()
    with pytest.raises(ValidationError):
        p.train.steps = 3  # type: ignore[misc]


def test_load_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(bad)


def test_readme_params_reference_is_current():
    from magicseg.core.config import params_reference

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- params-reference:start -->")[1].split(
        "<!-- params-reference:end -->"
    )[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert rows == params_reference(), "regenerate with: python scripts/readme_params.py"


def _set(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_renamed_key_is_one_line_naming_the_new_key(tmp_path, old):
    """An old key, through a real stage script: exit 2, one stderr line naming the new key."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    _set(data, old, "checkpoint" if old == "evaluate.model" else 1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/vocabulary.py"), "--out", str(tmp_path / "v")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    hint = " (checkpoint is now trained)" if old == "evaluate.model" else ""
    new = RENAMED[old]
    what = f"renamed to {new}" if isinstance(new, str) else f"replaced by {' and '.join(new)}"
    assert proc.stderr.splitlines() == [f"error: params.yaml: {old}: {what}{hint}"]
    assert not (tmp_path / "v").exists()


def test_renamed_keys_are_refused_and_new_keys_exist():
    new = {row.split("`")[1] for row in params_reference()}
    for old, renamed in RENAMED.items():
        renamed = (renamed,) if isinstance(renamed, str) else renamed
        assert set(renamed) <= new and old not in new, old
    # an old key in a block that also has the new one is still refused
    with pytest.raises(
        ConfigError, match=r"^params.yaml: train.model: renamed to train.architecture$"
    ):
        parse_params({"train": {"architecture": "offline", "model": "offline"}})
    # a key replaced by two: the line names both
    with pytest.raises(
        ConfigError,
        match=r"^params.yaml: vocabulary.holdout: replaced by vocabulary.holdout_combination "
        r"and vocabulary.holdout_novel_words$",
    ):
        parse_params({"vocabulary": {"holdout": 8}})
