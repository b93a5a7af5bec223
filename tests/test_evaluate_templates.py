"""Each class is encoded once per template at evaluation: the `evaluate` stage script
(stages/evaluate.py) on the paper profile with a stand-in CLIP checkpoint, every string the
tokenizer receives recorded.

The checkpoint's text encoder owns the templates (its training templates, 15 for the paper
profile); ``evaluate.templates`` replaces them, never wraps them. A template filled into
another ("a photo of a a photo of a aeroplane.") fails the test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from magicseg.model.clip import ZEGCLIP_TEMPLATES

ROOT = Path(__file__).resolve().parents[1]


def _paper_params(out: Path, sets: dict) -> dict:
    """params.yaml as ``-S profile=paper`` composes it, then the nested keys of ``sets``."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT), ["profile=paper"])
    params = yaml.safe_load(out.read_text())
    for key, value in sets.items():
        *path, last = key.split(".")
        node = params
        for p in path:
            node = node[p]
        node[last] = value
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def _stage_main():
    spec = importlib.util.spec_from_file_location("stage_evaluate", ROOT / "stages/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TEST_TEMPLATES = ("a photo of a {}",)  # the paper profile's evaluate.templates


def split(text: str, names: set[str], templates) -> list[tuple[str, str]]:
    """The (template, name) pairs with ``template.format(name) == text`` and ``name`` one of
    ``names``: exactly one for a class encoded once per template, none for a doubled one."""
    out = []
    for t in templates:
        head, tail = t.split("{}")
        if text.startswith(head) and text.endswith(tail) and len(text) >= len(head + tail):
            name = text[len(head) : len(text) - len(tail)]
            if name in names:
                out.append((t, name))
    return out


def test_split_refuses_a_template_in_a_template():
    names = {"aeroplane", "dining table"}
    templates = (*ZEGCLIP_TEMPLATES, *TEST_TEMPLATES)
    assert split("a photo of a aeroplane", names, templates) == [("a photo of a {}", "aeroplane")]
    assert split("a photo of a small dining table.", names, templates)
    assert not split("a photo of a a photo of a aeroplane.", names, templates)
    assert not split("a photo of a small a photo of a aeroplane.", names, templates)


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """The evaluate stage on the paper profile: a stand-in CLIP (atm decoder, the 15 training
    templates) trained on nothing, VOC and Context miniatures; the tokenizer's inputs."""
    import torch
    from tests.real_dataset_fixtures import make_context, make_voc
    from tests.tiny_clip import tiny_clip_dir
    from transformers import PreTrainedTokenizerBase

    from magicseg.core.io import write_manifest
    from magicseg.core.vocabulary import build_vocabulary
    from magicseg.model import build_model, save_checkpoint

    work = tmp_path_factory.mktemp("eval-templates")
    clip = tiny_clip_dir(work, image_size=32, patch=8)
    voc, _ = make_voc(work / "datasets", size=(40, 48))
    ctx, _ = make_context(work / "datasets", size=(40, 48))
    params = _paper_params(
        work / "params.yaml",
        {
            "train.clip.checkpoint": str(clip),
            "train.clip.decoder_layers": 1,
            "train.clip.decoder_heads": 2,
            "train.clip.decoder_dim": 16,
            "evaluate.short_side": 40,
            "evaluate.window": 32,
            "evaluate.stride": 24,
            "evaluate.gallery_samples": 0,
            "evaluate.voc.root": str(voc),
            "evaluate.context.root": str(ctx),
            "evaluate.coco_object.enabled": False,
        },
    )
    # the checkpoint as train writes it: the profile's train.clip block, its text encoder
    vocab = build_vocabulary("lvis")
    write_manifest(work / "vocab", vocab.to_frame())
    cfg = params["train"]["clip"]
    torch.manual_seed(0)
    model = build_model("clip", cfg, 16)
    save_checkpoint(work / "model.pt", model, "clip", cfg, "clip", list(vocab.names), [], (32, 32))

    seen: list[str] = []
    original = PreTrainedTokenizerBase.__call__

    def record(self, text=None, *args, **kwargs):
        seen.extend([text] if isinstance(text, str) else list(text or []))
        return original(self, text, *args, **kwargs)

    PreTrainedTokenizerBase.__call__ = record
    try:
        _stage_main()(
            checkpoint=work / "model.pt",
            vocab=work / "vocab",
            metrics=work / "metrics.json",
            plots=work / "plots",
            params_file=work / "params.yaml",
        )
    finally:
        PreTrainedTokenizerBase.__call__ = original
    return params, seen


@pytest.mark.slow
def test_evaluate_stage_never_wraps_a_template_in_a_template(stage_run):
    params, seen = stage_run
    assert params["evaluate"]["templates"] == ["a photo of a {}"]  # the profile's test template
    assert params["train"]["clip"]["templates"] == "zegclip15"
    assert seen, "the tokenizer received nothing"
    from magicseg.core.vocabulary import builtin_names

    names = set(builtin_names("voc")) | set(builtin_names("context")) | {"background"}
    templates = (*ZEGCLIP_TEMPLATES, *TEST_TEMPLATES)
    probe = "x"  # the encoder's dimension probe at load
    bad = [t for t in seen if t != probe and len(split(t, names, templates)) != 1]
    assert not bad, f"{len(bad)} of {len(seen)} strings not one template + one name: {bad[:3]}"
    # each VOC class exactly once, with the profile's one test template
    for name in ("aeroplane", "dining table", "person"):
        assert seen.count(f"a photo of a {name}") == 1, name
    # Context (protocol pc60_text): 60 text classes, "background" one of them, each once with
    # each of the 15 templates
    assert params["evaluate"]["context"]["protocol"] == "pc60_text"
    for name in ("background", "aeroplane", "wall"):
        assert [seen.count(t.format(name)) for t in ZEGCLIP_TEMPLATES] == [1] * 15, name
