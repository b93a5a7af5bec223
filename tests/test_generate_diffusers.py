"""The diffusers pair generator on a tiny random Stable Diffusion loaded from a local directory."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests.tiny_models import tiny_sd_pipeline_dir  # noqa: E402

from magicseg.core.config import DiffusersGeneratorParams, GenerateParams, parse_params  # noqa: E402
from magicseg.core.devices import resolve_dtype  # noqa: E402
from magicseg.core.errors import BackendError, ConfigError, DataError  # noqa: E402
from magicseg.core.io import read_image, read_manifest, write_manifest  # noqa: E402
from magicseg.generate import build_generator, run_generate  # noqa: E402
from magicseg.generate.base import PromptRecord  # noqa: E402
from magicseg.generate.diffusers_backend import (  # noqa: E402
    DiffusersPairGenerator,
    initial_latents,
    inpaint_counterfactual,
    load_inpaint_pipeline,
    load_pipeline,
)

SIZE = 16  # tiny VAE factor 2 -> 8x8 latents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_sd_pipeline_dir(tmp_path_factory.mktemp("tiny_sd"))


def make_params(model_dir, batch_size: int = 4, **diffusers) -> GenerateParams:
    opts = {"checkpoint": str(model_dir), "steps": 3, "device": "cpu", "guidance": 5.0} | diffusers
    return GenerateParams(
        backend="diffusers",
        height=SIZE,
        width=SIZE,
        batch_size=batch_size,
        diffusers=DiffusersGeneratorParams(**opts),
    )


def records(n: int = 3) -> list[PromptRecord]:
    return [
        PromptRecord(
            id=f"p{i}",
            prompt=f"a red ball number {i} on the beach",
            cf_prompt="the beach",
            class_ids=(1,),
            class_names=("red ball",),
            seed=1000 + i,
        )
        for i in range(n)
    ]


def test_registry_builds_generator_and_pairs_have_meta(model_dir):
    gen = build_generator(make_params(model_dir))
    assert isinstance(gen, DiffusersPairGenerator) and gen.name == "diffusers"
    recs = records(2)
    gen.check(recs)
    pairs = gen.generate(recs)
    assert len(pairs) == 2
    for rec, pair in zip(recs, pairs, strict=True):
        assert pair.positive.shape == (SIZE, SIZE, 3) and pair.positive.dtype == np.uint8
        assert pair.counterfactual.shape == (SIZE, SIZE, 3)
        assert pair.oracle_mask is None
        assert not np.array_equal(pair.positive, pair.counterfactual)  # prompts differ
        m = pair.meta
        assert m["seed"] == rec.seed and m["model"] == str(model_dir)
        assert m["scheduler"] == "DPMSolverMultistepScheduler"  # the default "dpm++"
        assert (m["steps"], m["guidance"], m["height"], m["width"]) == (3, 5.0, SIZE, SIZE)
        assert m["dtype"] == "float32" and m["device"] == "cpu" and m["seconds"] > 0
        json.dumps(m)  # run_generate stores it as JSON
    assert not np.array_equal(pairs[0].positive, pairs[1].positive)  # seeds differ


def test_pair_shares_initial_latents(model_dir):
    """Every UNet row of a pair's first step starts from the record's seeded latents."""
    gen = DiffusersPairGenerator(make_params(model_dir, images_per_call=4))
    seen = []
    hook = gen.pipe.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["sample"]).clone()),
        with_kwargs=True,
    )
    try:
        gen.generate(records(2))
    finally:
        hook.remove()
    first = seen[0]  # CFG rows: [uncond pos0, uncond cf0, uncond pos1, uncond cf1, cond ...x4]
    assert first.shape == (8, 4, SIZE // 2, SIZE // 2)
    for j, seed in enumerate((1000, 1001)):
        lat = initial_latents(seed, (4, SIZE // 2, SIZE // 2), torch.device("cpu"), torch.float32)
        for row in (2 * j, 2 * j + 1, 4 + 2 * j, 4 + 2 * j + 1):
            torch.testing.assert_close(first[row], lat[0] * gen.pipe.scheduler.init_noise_sigma)
    assert not torch.allclose(first[0], first[2])


def test_identical_prompts_give_identical_pair(model_dir):
    """With the same prompt twice the only difference could be the noise: there is none."""
    gen = DiffusersPairGenerator(make_params(model_dir, images_per_call=2))
    rec = PromptRecord("same", "a dog", "a dog", (1,), ("dog",), seed=7)
    (pair,) = gen.generate([rec])
    np.testing.assert_array_equal(pair.positive, pair.counterfactual)


@pytest.mark.parametrize("scheduler", ["dpm++", "euler_a"])
def test_same_seed_same_image_whatever_batch(model_dir, scheduler):
    recs = records(3)
    big = DiffusersPairGenerator(make_params(model_dir, scheduler=scheduler, images_per_call=6))
    one = DiffusersPairGenerator(make_params(model_dir, scheduler=scheduler, images_per_call=1))
    all_at_once = big.generate(recs)
    alone = one.generate([recs[1]])[0]
    diff_pos = np.abs(all_at_once[1].positive.astype(int) - alone.positive.astype(int)).max()
    diff_cf = np.abs(all_at_once[1].counterfactual.astype(int) - alone.counterfactual.astype(int))
    assert diff_pos <= 1 and diff_cf.max() <= 1
    # and a different record's pair is really different
    assert np.abs(all_at_once[0].positive.astype(int) - alone.positive.astype(int)).max() > 10


def test_naive_and_batched_paths_agree(model_dir):
    """Two separate batch-1 pipeline calls per prompt with the record's seed (the official
    loop, but one seed for both) == our batched pair."""
    gen = DiffusersPairGenerator(make_params(model_dir, images_per_call=6))
    recs = records(3)
    pairs = gen.generate(recs)
    pipe = gen.pipe
    for rec, pair in zip(recs, pairs, strict=True):
        for prompt, ours in ((rec.prompt, pair.positive), (rec.cf_prompt, pair.counterfactual)):
            naive = pipe(
                prompt,
                generator=torch.Generator("cpu").manual_seed(rec.seed),
                num_inference_steps=3,
                guidance_scale=5.0,
                height=SIZE,
                width=SIZE,
                output_type="np",
            ).images[0]
            naive = (np.clip(naive, 0, 1) * 255 + 0.5).astype(np.uint8)
            assert np.abs(naive.astype(int) - ours.astype(int)).max() <= 1


def test_save_load_round_trip(model_dir, tmp_path):
    params = make_params(model_dir)
    first = DiffusersPairGenerator(params)
    before = first.generate(records(1))[0]
    first.pipe.save_pretrained(tmp_path / "copy")
    again = DiffusersPairGenerator(make_params(tmp_path / "copy"))
    after = again.generate(records(1))[0]
    np.testing.assert_array_equal(before.positive, after.positive)
    np.testing.assert_array_equal(before.counterfactual, after.counterfactual)


def test_run_generate_writes_pngs_and_manifest(model_dir, tmp_path):
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
    params = make_params(model_dir, batch_size=2)
    out = run_generate(tmp_path / "prompts", tmp_path / "gen", params, num_classes=1)
    manifest = read_manifest(tmp_path / "gen")
    assert list(manifest["id"]) == ["p0", "p1", "p2"] and len(out) == 3
    row = manifest.iloc[2]
    assert row.backend == "diffusers" and row.oracle_mask is None
    meta = json.loads(row.meta)
    assert meta["seed"] == 1002 and meta["steps"] == 3 and meta["scheduler"]
    pos = read_image(tmp_path / "gen" / row.image)
    cf = read_image(tmp_path / "gen" / row.cf_image)
    assert pos.shape == cf.shape == (SIZE, SIZE, 3)
    # the written PNGs are the pair a direct call paints (batch 2 -> 1 pair alone at the end)
    direct = DiffusersPairGenerator(params).generate([recs[2]])[0]
    np.testing.assert_array_equal(pos, direct.positive)


def test_inpaint_counterfactual_keeps_background(model_dir):
    params = make_params(model_dir)
    gen = DiffusersPairGenerator(params)
    positive = gen.generate(records(1))[0].positive
    mask = np.zeros((SIZE, SIZE), bool)
    mask[5:9, 6:10] = True
    pipe = load_inpaint_pipeline(params.diffusers, gen.device, gen.dtype, text2img=gen.pipe)
    cf, region = inpaint_counterfactual(
        pipe, positive, mask, "the beach", seed=3, dilate=2, steps=3, guidance=5.0
    )
    assert cf.shape == positive.shape and cf.dtype == np.uint8
    assert region.sum() > mask.sum() and region[mask].all()  # dilated, covers the object
    np.testing.assert_array_equal(cf[~region], positive[~region])  # background bit-identical
    assert np.abs(cf[region].astype(int) - positive[region].astype(int)).mean() > 5
    again, _ = inpaint_counterfactual(
        pipe, positive, mask, "the beach", seed=3, dilate=2, steps=3, guidance=5.0
    )
    np.testing.assert_array_equal(cf, again)  # seeded
    empty, none = inpaint_counterfactual(pipe, positive, np.zeros_like(mask), "x", seed=3)
    assert not none.any()
    np.testing.assert_array_equal(empty, positive)


# ------------------------------------------------------------------------------------------
# clear errors, before any image
# ------------------------------------------------------------------------------------------
def test_missing_local_dir_and_not_a_pipeline_dir(tmp_path):
    with pytest.raises(BackendError, match=r"checkpoint: .*nope does not exist \(a local model"):
        DiffusersPairGenerator(make_params(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        DiffusersPairGenerator(make_params(tmp_path / "empty"))


def test_unknown_hub_id_offline_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BackendError, match="huggingface-cli download someone/no-such-model"):
        DiffusersPairGenerator(make_params("someone/no-such-model"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_but_absent(model_dir):
    with pytest.raises(BackendError, match="CUDA is not available"):
        DiffusersPairGenerator(make_params(model_dir, device="cuda"))


def test_bad_dtype_size_and_records(model_dir):
    with pytest.raises(ConfigError, match="generate.diffusers.dtype: float16 is not supported"):
        resolve_dtype("float16", torch.device("cpu"), "generate.diffusers.dtype")
    with pytest.raises(ConfigError, match="generate.height: must be a multiple of 8"):
        parse_params({"generate": {"backend": "diffusers", "height": 100}})
    gen = DiffusersPairGenerator(make_params(model_dir))
    bad = PromptRecord("b", "a cat", " ", (1,), ("cat",), seed=1)
    with pytest.raises(DataError, match="prompt b: empty"):
        gen.check([bad])


def test_load_pipeline_sets_scheduler(model_dir):
    opts = DiffusersGeneratorParams(checkpoint=str(model_dir), scheduler="unipc")
    pipe = load_pipeline(opts, torch.device("cpu"), torch.float32)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.safety_checker is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_pair_matches_cpu_roughly(model_dir):
    gpu = DiffusersPairGenerator(make_params(model_dir, device="cuda"))
    cpu = DiffusersPairGenerator(make_params(model_dir))
    a, b = gpu.generate(records(2)), cpu.generate(records(2))
    assert gpu.meta()["dtype"] in ("bfloat16", "float16")
    for x, y in zip(a, b, strict=True):
        assert np.abs(x.positive.astype(int) - y.positive.astype(int)).mean() < 8


def test_few_step_model_settings_without_guidance(model_dir):
    """SD-Turbo style: checkpoint scheduler, 1 step, guidance 0 -> 2 UNet rows per pair."""
    gen = DiffusersPairGenerator(
        make_params(model_dir, scheduler="default", steps=1, guidance=0.0, images_per_call=4)
    )
    rows = []
    hook = gen.pipe.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append((args[0] if args else kwargs["sample"]).shape[0]),
        with_kwargs=True,
    )
    try:
        pairs = gen.generate(records(2))
    finally:
        hook.remove()
    assert rows == [4]  # one step, 2 pairs x (positive, counterfactual), no CFG rows
    assert pairs[0].meta["scheduler"] == "DDIMScheduler"  # the checkpoint's own
    assert not np.array_equal(pairs[0].positive, pairs[0].counterfactual)


def test_sdxl_pipeline_through_the_same_params(tmp_path):
    from tests.tiny_models import tiny_sdxl_pipeline_dir

    model = tiny_sdxl_pipeline_dir(tmp_path)
    big = DiffusersPairGenerator(make_params(model, images_per_call=4))
    one = DiffusersPairGenerator(make_params(model, images_per_call=1))
    assert type(big.pipe).__name__ == "StableDiffusionXLPipeline"
    pairs = big.generate(records(2))
    alone = one.generate([records(2)[1]])[0]
    assert pairs[1].positive.shape == (SIZE, SIZE, 3)
    assert np.abs(pairs[1].positive.astype(int) - alone.positive.astype(int)).max() <= 1
    assert np.abs(pairs[1].counterfactual.astype(int) - alone.counterfactual.astype(int)).max() <= 1
