"""The diffusers generator beyond SD 1.5: SDXL, SD3 (no T5), FLUX.1 and FLUX.2 [klein] on tiny
random pipelines built from configs (tokenizers built in the test: no hub); the family, licence
and option refusals of the constructor and the pre-flight."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests import tiny_models  # noqa: E402

from magicseg.core.config import DiffusersGeneratorParams, GenerateParams, Params  # noqa: E402
from magicseg.core.errors import ConfigError  # noqa: E402
from magicseg.generate.base import PromptRecord  # noqa: E402
from magicseg.generate.diffusers import DiffusersPairGenerator  # noqa: E402
from magicseg.generate.diffusers.loading import to_uint8  # noqa: E402
from magicseg.preflight import check_models  # noqa: E402

SIZE = 16  # tiny VAEs have factor 2: 8x8 latents (FLUX: 4x4 packed tokens)
STEPS = 2
BUILDERS = {
    "sdxl": (tiny_models.tiny_sdxl_pipeline_dir, 5.0, "StableDiffusionXLPipeline"),
    "sd3": (tiny_models.tiny_sd3_pipeline_dir, 5.0, "StableDiffusion3Pipeline"),
    "flux": (tiny_models.tiny_flux_pipeline_dir, 0.0, "FluxPipeline"),
    "flux2": (tiny_models.tiny_flux2_klein_pipeline_dir, 0.0, "Flux2KleinPipeline"),
}
TRANSFORMERS = ("sd3", "flux", "flux2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> its tiny pipeline directory, built once per module on first use."""
    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            made[family] = BUILDERS[family][0](tmp_path_factory.mktemp(family))
        return made[family]

    return get


def params(model, kind: str, batch_size: int = 2, **opts) -> GenerateParams:
    base = {
        "checkpoint": str(model),
        "steps": STEPS,
        "device": "cpu",
        "guidance": BUILDERS[kind][1],
        "scheduler": "default",
    }
    return GenerateParams(
        backend="diffusers",
        height=SIZE,
        width=SIZE,
        batch_size=batch_size,
        diffusers=DiffusersGeneratorParams(**(base | opts)),
    )


def records(n: int) -> list[PromptRecord]:
    return [
        PromptRecord(
            id=f"p{i}",
            prompt=f"a photo of a red ball number {i} on the beach",
            cf_prompt="a photo of the beach",
            class_ids=(1,),
            class_names=("red ball",),
            seed=300 + i,
        )
        for i in range(n)
    ]


def rows_per_step(gen: DiffusersPairGenerator):
    """A hook recording the batch rows of every denoiser forward; returns (rows, handle)."""
    rows: list[int] = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        rows.append(x.shape[0])

    return rows, gen.denoiser.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------------------------
# same-noise pairs and batching, per family
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(BUILDERS))
def test_pair_is_two_same_seed_pipeline_calls(tiny, family):
    """One batched call of two pairs (4 images, the family's latent layout) gives the images
    the pipeline paints when called once per image with a generator of the pair's seed
    (its own noise draw), to < 1e-4; the pairs' uint8 images are those images."""
    gen = DiffusersPairGenerator(params(tiny(family), family, family=family))
    assert gen.family.name == family and type(gen.pipe).__name__ == BUILDERS[family][2]
    recs = records(2)
    prompts = [p for r in recs for p in (r.prompt, r.cf_prompt)]
    seeds = [r.seed for r in recs for _ in range(2)]
    batched = gen.call(prompts, seeds).images
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone = gen.pipe(
            prompt=prompt,
            generator=torch.Generator("cpu").manual_seed(seed),
            num_inference_steps=STEPS,
            guidance_scale=gen.opts.guidance,
            height=SIZE,
            width=SIZE,
            output_type="np",
        ).images[0]
        assert np.abs(batched[i] - alone).max() < 1e-4, (family, i)
    # the prompts differ, so do the images (little on the tiny random Qwen of klein)
    assert np.abs(batched[0] - batched[1]).max() > 1e-4, family
    pairs = gen.generate(recs)
    for j, pair in enumerate(pairs):
        assert pair.positive.shape == (SIZE, SIZE, 3) and pair.positive.dtype == np.uint8
        assert np.abs(pair.positive.astype(int) - to_uint8(batched[2 * j])).max() <= 1
        assert np.abs(pair.counterfactual.astype(int) - to_uint8(batched[2 * j + 1])).max() <= 1
        assert pair.meta["family"] == family and pair.meta["pipeline"] == BUILDERS[family][2]
        json.dumps(pair.meta)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_batching_changes_no_pair(tiny, family):
    """Three pairs in one call (6 images; guidance doubles the denoiser rows where the family
    uses classifier-free guidance) equal the pairs made one image per call."""
    big = DiffusersPairGenerator(params(tiny(family), family, batch_size=3))
    one = DiffusersPairGenerator(params(tiny(family), family, images_per_call=1))
    assert big.images_per_call == 6
    rows, handle = rows_per_step(big)
    try:
        together = big.generate(records(3))
    finally:
        handle.remove()
    cfg = family in ("sdxl", "sd3")  # guidance 5 here; FLUX has no CFG rows at guidance 0
    assert set(rows) == {12 if cfg else 6}
    alone = one.generate(records(3))
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a.positive.astype(int) - b.positive.astype(int)).max() <= 1
        assert np.abs(a.counterfactual.astype(int) - b.counterfactual.astype(int)).max() <= 1
    float_big = big.call(["a dog", "a cat"], [5, 5]).images
    float_one = np.concatenate([one.call([p], [5]).images for p in ("a dog", "a cat")])
    assert np.abs(float_big - float_one).max() < 1e-4


def test_flux_latents_are_packed_and_flux2_latents_are_not(tiny):
    """FLUX.1's ``latents=`` are 2x2-packed tokens, FLUX.2's are the unpacked grid."""
    flux = DiffusersPairGenerator(params(tiny("flux"), "flux"))
    assert tuple(flux.noise([1, 2]).shape) == (2, (SIZE // 4) ** 2, 4 * 4)  # 4 channels x 2x2
    flux2 = DiffusersPairGenerator(params(tiny("flux2"), "flux2"))
    assert tuple(flux2.noise([1]).shape) == (1, 16, SIZE // 4, SIZE // 4)
    sd3 = DiffusersPairGenerator(params(tiny("sd3"), "sd3"))
    assert tuple(sd3.noise([1]).shape) == (1, 4, SIZE // 2, SIZE // 2)


# --------------------------------------------------------------------------------------------
# refusals: one line naming the key, before any weight loads
# --------------------------------------------------------------------------------------------
def test_a_named_family_must_be_the_checkpoints(tiny):
    with pytest.raises(ConfigError, match=r"^generate\.diffusers\.family: 'sd3', but .*'flux'"):
        DiffusersPairGenerator(params(tiny("flux"), "flux", family="sd3"))


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_inpaint_counterfactual_refused_for_joint_attention(tiny, family):
    with pytest.raises(ConfigError, match=r"^generate\.diffusers\.counterfactual_mode: inpaint"):
        DiffusersPairGenerator(params(tiny(family), family, counterfactual_mode="inpaint"))


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_scheduler_swap_refused_on_flow_matching(tiny, family):
    with pytest.raises(ConfigError, match=r"^generate\.diffusers\.scheduler: 'dpm\+\+'"):
        DiffusersPairGenerator(params(tiny(family), family, scheduler="dpm++"))


@pytest.mark.parametrize(
    ("family", "opts", "key"),
    [
        ("flux", {"guidance": 3.5}, "guidance"),
        ("flux2", {"guidance": 4.0}, "guidance"),
        ("flux", {"negative_prompt": "blurry"}, "negative_prompt"),
        ("flux2", {"negative_prompt": "blurry"}, "negative_prompt"),
        ("sd3", {"safety_checker": True}, "safety_checker"),
        ("sd3", {"attention_slicing": True}, "attention_slicing"),
    ],
)
def test_options_the_family_would_ignore_are_refused(tiny, family, opts, key):
    with pytest.raises(ConfigError, match=rf"^generate\.diffusers\.{key}: "):
        DiffusersPairGenerator(params(tiny(family), family, **opts))


def test_unsupported_pipeline_class_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionInpaintPipeline"})
    )
    with pytest.raises(ConfigError, match=r"^generate\.diffusers\.checkpoint: .*Inpaint"):
        DiffusersPairGenerator(params(tmp_path, "sdxl"))


def test_noncommercial_flux_dev_type_needs_the_opt_in(tmp_path):
    """A FLUX.1 transformer with guidance embedding is [dev] (non-commercial): refused
    without ``accept_noncommercial``; with it, its guidance is used (no refusal)."""
    model = tiny_models.tiny_flux_pipeline_dir(tmp_path, guidance_embeds=True)
    with pytest.raises(ConfigError, match=r"^generate\.diffusers\.accept_noncommercial: .*non-"):
        DiffusersPairGenerator(params(model, "flux", guidance=3.5))
    gen = DiffusersPairGenerator(params(model, "flux", guidance=3.5, accept_noncommercial=True))
    a = gen.call(["a dog"], [1]).images
    b = gen.pipe(
        prompt="a dog",
        generator=torch.Generator("cpu").manual_seed(1),
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    assert np.abs(a - b).max() > 1e-4  # the guidance value reaches the transformer


def test_licence_from_the_model_card_and_from_the_documented_ids(tiny, tmp_path):
    model = tmp_path / "klein-copy"
    shutil.copytree(tiny("flux2"), model)
    (model / "README.md").write_text(
        "---\nlicense: other\nlicense_name: flux-non-commercial-license\n---\n# card\n"
    )
    with pytest.raises(ConfigError, match=r"accept_noncommercial: .*flux-non-commercial"):
        DiffusersPairGenerator(params(model, "flux2"))
    DiffusersPairGenerator(params(model, "flux2", accept_noncommercial=True))
    # an already built pipeline under a documented non-commercial id
    pipe = DiffusersPairGenerator(params(tiny("flux"), "flux")).pipe
    dev = params("black-forest-labs/FLUX.1-dev", "flux")
    with pytest.raises(ConfigError, match=r"accept_noncommercial: .*FLUX\.1-dev"):
        DiffusersPairGenerator(dev, pipeline=pipe)


def test_preflight_names_each_refusing_key(tiny):
    def checks(kind: str, **opts):
        p = Params(generate=params(tiny(kind), kind, **opts))
        return {c.key: c for c in check_models(p)}

    ok = checks("flux")["generate.diffusers.checkpoint"]
    assert ok.status == "ok" and "FluxPipeline (flux)" in ok.message, ok.line()
    bad = checks("sd3", counterfactual_mode="inpaint")["generate.diffusers.counterfactual_mode"]
    assert bad.status == "error" and bad.message.startswith("inpaint records UNet"), bad.line()
    bad = checks("flux", family="sdxl")["generate.diffusers.family"]
    assert bad.status == "error" and "'flux'" in bad.message
    bad = checks("flux2", guidance=2.0)["generate.diffusers.guidance"]
    assert bad.status == "error" and "is_distilled" in bad.message
    sdxl = checks("sdxl", scheduler="dpm++")["generate.diffusers.checkpoint"]
    assert sdxl.status == "ok" and "StableDiffusionXLPipeline (sdxl)" in sdxl.message


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2", "sdxl"])
def test_the_model_config_check_accepts_every_family(tiny, kind):
    """The pre-flight's config check (denoiser inputs vs VAE channels, size vs the latent
    grid) knows each family's layout: FLUX packs 2x2 latent patches (4x the VAE's channels)."""
    from magicseg.preflight.models import check_diffusers

    p = Params(generate=params(tiny(kind), kind).model_copy(update={"height": 32, "width": 32}))
    errors = [c for c in check_diffusers(p) if c.status == "error"]
    assert not errors, [c.line() for c in errors]


def test_the_generate_stage_writes_flux_pairs(tiny, tmp_path):
    """run_generate with FLUX.1: files and manifest as for SD 1.5, the family in the meta,
    and the written positives are the pairs a direct call paints."""
    import pandas as pd

    from magicseg.core.io import read_image, read_manifest, write_manifest
    from magicseg.generate import run_generate

    recs = records(3)
    frame = pd.DataFrame(
        {
            "id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "cf_prompt": [r.cf_prompt for r in recs],
            "class_ids": [list(r.class_ids) for r in recs],
            "class_names": [list(r.class_names) for r in recs],
            "seed": [r.seed for r in recs],
        }
    )
    write_manifest(tmp_path / "prompts", frame)
    p = params(tiny("flux"), "flux")
    run_generate(tmp_path / "prompts", tmp_path / "gen", p, num_classes=1)
    manifest = read_manifest(tmp_path / "gen")
    assert list(manifest["id"]) == ["p0", "p1", "p2"]
    row = manifest.iloc[2]
    meta = json.loads(row.meta)
    assert meta["family"] == "flux" and meta["pipeline"] == "FluxPipeline"
    assert meta["guidance"] == 0.0 and meta["shared_latents"] is True
    direct = DiffusersPairGenerator(p).generate([recs[2]])[0]
    np.testing.assert_array_equal(read_image(tmp_path / "gen" / row.image), direct.positive)
    np.testing.assert_array_equal(
        read_image(tmp_path / "gen" / row.cf_image), direct.counterfactual
    )
