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
from magicseg.generate.diffusers import (  # noqa: E402
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


def make_params(model_dir, batch_size: int = 4, size: int = SIZE, **diffusers) -> GenerateParams:
    opts = {"checkpoint": str(model_dir), "steps": 3, "device": "cpu", "guidance": 5.0} | diffusers
    return GenerateParams(
        backend="diffusers",
        height=size,
        width=size,
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


def test_images_per_call_auto_batches_on_a_cpu(model_dir):
    """auto = the whole batch (both images of every pair), at most 8 images on a CPU."""
    rows = []
    gen = DiffusersPairGenerator(make_params(model_dir, batch_size=3))
    assert gen.images_per_call == 6
    hook = gen.pipe.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append((args[0] if args else kwargs["sample"]).shape[0]),
        with_kwargs=True,
    )
    try:
        gen.generate(records(3))
    finally:
        hook.remove()
    assert set(rows) == {12}  # one call: 6 images x 2 (guidance) per UNet step
    assert DiffusersPairGenerator(make_params(model_dir, batch_size=64)).images_per_call == 8
    assert DiffusersPairGenerator(make_params(model_dir, batch_size=1)).images_per_call == 2


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


def test_independent_pair_noise_reproducible_and_from_its_named_stream(model_dir):
    """``pair_noise: independent`` (published): the positive as with shared noise, the
    counterfactual from the seed ``generate.cf_noise`` of the pair's seed, the same every run."""
    from magicseg.core.seeding import derive_seed

    rec = records(1)[0]
    shared = DiffusersPairGenerator(make_params(model_dir, images_per_call=1))
    indep = DiffusersPairGenerator(
        make_params(model_dir, images_per_call=1, pair_noise="independent")
    )
    (s,) = shared.generate([rec])
    (a,) = indep.generate([rec])
    (b,) = indep.generate([rec])
    np.testing.assert_array_equal(a.positive, s.positive)
    assert not np.array_equal(a.counterfactual, s.counterfactual)
    np.testing.assert_array_equal(a.counterfactual, b.counterfactual)  # reproducible
    cf_seed = derive_seed(rec.seed, "generate.cf_noise")
    other = PromptRecord(rec.id, rec.prompt, rec.cf_prompt, rec.class_ids, rec.class_names, cf_seed)
    np.testing.assert_array_equal(a.counterfactual, shared.generate([other])[0].counterfactual)
    assert a.meta["cf_seed"] == cf_seed and a.meta["shared_latents"] is False
    assert s.meta["shared_latents"] is True and "cf_seed" not in s.meta
    # the same prompt twice: shared noise gives one image, independent noise two
    same = PromptRecord("same", "a dog", "a dog", (1,), ("dog",), seed=7)
    (pair,) = indep.generate([same])
    assert not np.array_equal(pair.positive, pair.counterfactual)


def test_independent_pair_noise_needs_prompt_swap():
    with pytest.raises(ConfigError, match=r"generate\.diffusers\.pair_noise: independent needs"):
        parse_params(
            {
                "generate": {
                    "diffusers": {"pair_noise": "independent", "counterfactual_mode": "inpaint"}
                }
            }
        )


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
# counterfactual_mode: inpaint, wired into the generate stage
# ------------------------------------------------------------------------------------------
INPAINT_SIZE = 32  # latents 16x16, cross-attention at 8x8


def inpaint_params(model_dir, batch_size: int = 3, **diffusers) -> GenerateParams:
    opts = {"counterfactual_mode": "inpaint", "inpaint_threshold": 0.6, "inpaint_dilate": 1}
    opts |= {"images_per_call": 1} | diffusers
    return make_params(model_dir, batch_size=batch_size, size=INPAINT_SIZE, **opts)


def write_prompts(directory, recs) -> None:
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
    write_manifest(directory, frame)


def read_pairs(directory) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]]:
    """(positive, counterfactual, cf_region as bool or None, meta) per manifest row."""
    from magicseg.core.io import read_mask

    out = []
    for row in read_manifest(directory).itertuples(index=False):
        region = read_mask(directory / row.cf_region) > 0 if row.cf_region else None
        out.append(
            (
                read_image(directory / row.image),
                read_image(directory / row.cf_image),
                region,
                json.loads(row.meta),
            )
        )
    return out


def image_files(directory) -> dict[str, bytes]:
    return {
        f.relative_to(directory).as_posix(): f.read_bytes()
        for sub in ("images", "counterfactual", "cf_region")
        for f in sorted((directory / sub).glob("*.png"))
    }


def test_inpaint_mode_repaints_only_the_recorded_region(model_dir, tmp_path):
    """Through run_generate: the counterfactual is the positive byte for byte outside the
    recorded region and differs inside it; the positive is prompt_swap's positive; the region
    is a non-empty, partial, dilated mask; the manifest records the mode."""
    recs = records(3)
    write_prompts(tmp_path / "prompts", recs)
    run_generate(tmp_path / "prompts", tmp_path / "inpaint", inpaint_params(model_dir), 1)
    swap = inpaint_params(model_dir, counterfactual_mode="prompt_swap")
    run_generate(tmp_path / "prompts", tmp_path / "swap", swap, 1)
    manifest = read_manifest(tmp_path / "inpaint")
    assert list(manifest["cf_region"]) == [f"cf_region/{r.id}.png" for r in recs]
    assert read_manifest(tmp_path / "swap")["cf_region"].isna().all()
    for (pos, cf, region, meta), (pos_swap, cf_swap, none, meta_swap) in zip(
        read_pairs(tmp_path / "inpaint"), read_pairs(tmp_path / "swap"), strict=True
    ):
        assert meta["counterfactual_mode"] == "inpaint" and none is None
        assert meta_swap["counterfactual_mode"] == "prompt_swap"
        assert meta["inpaint_threshold"] == 0.6 and meta["inpaint_dilate"] == 1
        np.testing.assert_array_equal(pos, pos_swap)  # recording attention changes nothing
        assert 0.05 < region.mean() < 0.95  # a real region, not all or nothing
        assert meta["cf_region_fraction"] == pytest.approx(region.mean(), abs=1e-5)
        np.testing.assert_array_equal(cf[~region], pos[~region])  # background: the same bytes
        assert np.abs(cf[region].astype(int) - pos[region].astype(int)).mean() > 3
        assert not np.array_equal(cf, cf_swap)  # not the prompt-swap counterfactual

    # dilated: the region at inpaint_dilate 1 is the region at 0 grown by a 1-pixel disk
    from magicseg.generate.diffusers import dilate_mask

    tight = DiffusersPairGenerator(inpaint_params(model_dir, inpaint_dilate=0)).generate(recs)
    for (_, _, region, _), pair in zip(read_pairs(tmp_path / "inpaint"), tight, strict=True):
        assert pair.cf_region.sum() < region.sum()
        np.testing.assert_array_equal(region, dilate_mask(pair.cf_region, 1))


def test_inpaint_mode_is_deterministic_whatever_the_batch_size(model_dir, tmp_path):
    recs = records(3)
    write_prompts(tmp_path / "prompts", recs)
    for name, batch in (("a", 3), ("b", 3), ("c", 1), ("d", 2)):
        params = inpaint_params(model_dir, batch_size=batch)
        run_generate(tmp_path / "prompts", tmp_path / name, params, 1)
    first = image_files(tmp_path / "a")
    assert len(first) == 9
    for name in "bcd":
        assert image_files(tmp_path / name) == first, name


def test_inpaint_mode_batched_calls_keep_each_records_region(model_dir):
    """Several images per call (CFG rows [uncond x n, cond x n]): each record's region is
    still its own; the images agree with one-per-call to the last bit of a pixel."""
    recs = records(3)
    batched = DiffusersPairGenerator(inpaint_params(model_dir, images_per_call=6)).generate(recs)
    alone = DiffusersPairGenerator(inpaint_params(model_dir)).generate(recs)
    for a, b in zip(batched, alone, strict=True):
        assert np.abs(a.positive.astype(int) - b.positive.astype(int)).max() <= 1
        assert (a.cf_region == b.cf_region).mean() > 0.98
        np.testing.assert_array_equal(a.counterfactual[~a.cf_region], a.positive[~a.cf_region])
    assert (batched[0].cf_region != batched[1].cf_region).any()  # records differ


def test_inpaint_mode_through_the_stage_cli(model_dir, tmp_path):
    import subprocess
    import sys

    import yaml
    from tests.scaleout_helpers import ROOT, env

    from magicseg.core.config import Params, params_to_dict
    from magicseg.core.vocabulary import build_vocabulary

    recs = records(2)
    write_prompts(tmp_path / "prompts", recs)
    vocab = build_vocabulary("procedural")
    write_manifest(tmp_path / "vocabulary", vocab.to_frame())
    params = Params().model_copy(update={"generate": inpaint_params(model_dir)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params)))
    cmd = [
        sys.executable, str(ROOT / "stages/generate.py"), "--vocab", str(tmp_path / "vocabulary"),
        "--prompts", str(tmp_path / "prompts"), "--out", str(tmp_path / "gen"),
        "--params-file", str(tmp_path / "params.yaml"),
    ]  # fmt: skip
    run = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    pairs = read_pairs(tmp_path / "gen")
    assert len(pairs) == 2
    for pos, cf, region, meta in pairs:
        assert meta["counterfactual_mode"] == "inpaint" and region.any()
        np.testing.assert_array_equal(cf[~region], pos[~region])
        assert (cf[region] != pos[region]).any()


def test_recorder_keeps_the_conditional_rows_softmax():
    """One cross-attention call of 2n rows ([uncond x n, cond x n]): the recorder keeps the
    head-averaged softmax(q k^T / sqrt(d)) of the cond rows, per image, and the layer's output
    is the wrapped processor's."""
    from diffusers.models.attention_processor import Attention

    from magicseg.generate.diffusers import CrossAttentionRecorder

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    unet = torch.nn.Module()
    unet.attn_processors = {"x.attn2.processor": attn.processor}  # what the recorder wraps
    unet.set_attn_processor = lambda procs: attn.set_processor(procs["x.attn2.processor"])
    n, grid = 2, (2, 3)
    hidden = torch.randn(2 * n, 6, 8)
    text = torch.randn(2 * n, 5, 6)
    expected_out = attn(hidden, encoder_hidden_states=text)
    with torch.no_grad(), CrossAttentionRecorder(unet, (4, 6), factors=[2]) as rec:
        rec.reset(n)
        out = attn(hidden, encoder_hidden_states=text)
        out = attn(hidden, encoder_hidden_states=text)  # a second layer/step: summed
    torch.testing.assert_close(out, expected_out)
    q = attn.to_q(hidden[n:]).view(n, 6, 2, 4).transpose(1, 2)
    k = attn.to_k(text[n:]).view(n, 5, 2, 4).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / 2.0).softmax(-1).mean(1)  # n x 6 x 5
    maps = rec.maps([[[1, 3]], [[4], []]], size=grid)
    for j, idx in ((0, [1, 3]), (1, [4])):
        want = probs[j][:, idx].mean(-1).reshape(grid).detach().numpy()
        np.testing.assert_allclose(maps[j][0], want, rtol=1e-5)  # same size: no resampling
    assert maps[1][1] is None
    assert attn.processor.__class__.__name__ != "_RecordingProcessor"  # restored


def test_class_token_positions_find_every_form_of_the_name(model_dir):
    from magicseg.generate.diffusers import class_token_positions

    tok = DiffusersPairGenerator(make_params(model_dir)).pipe.tokenizer
    prompt = "Two red balls near a red ball's shadow on the beach"
    ball, beach, kite = class_token_positions(tok, prompt, ["red ball", "beach", "kite"])
    ids = tok(prompt, max_length=tok.model_max_length, truncation=True)["input_ids"]
    text = [tok.decode([ids[i]]).strip() for i in ball]
    assert "".join(text) == "redballsredball"  # plural and possessive, no article
    assert "".join(tok.decode([ids[i]]).strip() for i in beach) == "beach"
    assert kite == [] and 0 not in ball  # absent name; never the start token
    far = "sand " * 100 + "and a red ball"  # the mention lies beyond the 77-token truncation
    assert class_token_positions(tok, far, ["red ball"]) == [[]]


def test_inpaint_mode_class_beyond_the_truncation_keeps_the_positive(model_dir, capsys):
    far = PromptRecord("far", "sand " * 100 + "and a red ball", "sand", (1,), ("red ball",), 5)
    gen = DiffusersPairGenerator(inpaint_params(model_dir))
    (pair,) = gen.generate([far])
    assert not pair.cf_region.any() and pair.meta["cf_region_fraction"] == 0
    np.testing.assert_array_equal(pair.counterfactual, pair.positive)
    assert "prompt far: no object region" in capsys.readouterr().err


def test_cache_key_follows_the_inpaint_params(model_dir):
    from magicseg.generate import generate_keys

    recs = records(1)

    def key(**kw):
        gen = DiffusersPairGenerator(make_params(model_dir, **kw))
        return generate_keys(recs, gen.params, gen, 1)[0]

    keys = {
        key(),
        key(counterfactual_mode="inpaint"),
        key(counterfactual_mode="inpaint", inpaint_threshold=0.5),
        key(counterfactual_mode="inpaint", inpaint_dilate=3),
    }
    assert len(keys) == 4


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
    # the inpainting counterfactual works on SDXL's UNet and pipelines too
    inp = DiffusersPairGenerator(inpaint_params(model, images_per_call=2))
    assert type(inp.inpaint_pipe).__name__ == "StableDiffusionXLInpaintPipeline"
    for pair in inp.generate(records(2)):
        region = pair.cf_region
        assert 0 < region.mean() < 1
        np.testing.assert_array_equal(pair.counterfactual[~region], pair.positive[~region])
        assert np.abs(pair.counterfactual[region].astype(int) - pair.positive[region]).mean() > 3
