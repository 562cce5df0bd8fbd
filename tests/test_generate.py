"""KV-cache decoding and generation: cached logits equal the full forward for every strategy."""

from __future__ import annotations

import pytest
import torch

from normlab import STRATEGIES, ModelConfig, build_model
from normlab.nn.model import sample_next

SIZES = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48)


def _trained_like(name: str, **extra):
    """A model whose norm gains and scalars are not at their init values (so a slot that the
    cached path skipped or applied twice would show)."""
    model = build_model(ModelConfig.from_strategy(name, **{**SIZES, **extra}), seed=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_cached_incremental_logits_equal_full_forward(name):
    model = _trained_like(name)
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 20)
        pieces = [model(ids[:, :7], cache=cache)]  # a prefill of several tokens
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(7, 12)]  # one at a time
        pieces.append(model(ids[:, 12:], cache=cache))  # several tokens after a past: masked path
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_greedy_generate_equals_argmax_decoding_without_cache(name):
    model = _trained_like(name)
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, max_new_tokens=10)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_left_padded_batch_matches_each_sequence_alone():
    model = _trained_like("hybridnorm_star")
    short, long = torch.tensor([[5, 9, 2]]), torch.tensor([[7, 1, 3, 8, 4, 6]])
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], 1), long])
    mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(batch, attention_mask=mask, position_ids=positions)
        torch.testing.assert_close(logits[0, 3:], model(short)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], model(long)[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(logits).all()  # pad queries see only themselves


def test_shared_context_continuations_match_whole_sequences():
    """One context run once, two continuations on top of a copied cache, with the padding after
    the shorter context hidden: the scoring pattern of normlab.eval."""
    model = _trained_like("bhyt")
    contexts = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([2, 7])]
    conts = [torch.tensor([9, 2]), torch.tensor([6, 5, 3])]
    ctx = torch.zeros(2, 5, dtype=torch.long)
    ctx[1, :2] = contexts[1]
    ctx[0] = contexts[0]
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        model.model(ctx, cache=cache)
        cache = cache.repeat_interleave(torch.tensor([1, 1]), 8)
        cont = torch.zeros(2, 3, dtype=torch.long)
        cont[0, :2], cont[1] = conts[0], conts[1]
        lengths = torch.tensor([5, 2])
        positions = lengths[:, None] + torch.arange(3)
        keys = torch.cat([torch.arange(5)[None] < lengths[:, None], torch.ones(2, 3, dtype=torch.bool)], 1)
        logits = model(cont, position_ids=positions, attention_mask=keys.long(), cache=cache)
        for row in range(2):
            whole = model(torch.cat([contexts[row], conts[row]])[None])[0, len(contexts[row]):]
            torch.testing.assert_close(logits[row, :len(conts[row])], whole, atol=1e-5, rtol=1e-5)


def test_sampling_filters_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=gen), torch.ones(500, dtype=torch.long))
    # top_p = 0.5: token 1 alone has p = 0.64 >= 0.5, so only it survives
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {1}
    # top_k = 2 keeps tokens 1 and 3, in proportion e^3 : e^2
    draws = sample_next(logits, 1.0, top_k=2, generator=gen)
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()
    assert abs(share - 1 / (1 + torch.e ** -1)) < 0.08
    model = _trained_like("pre_norm")
    prompt = torch.tensor([[1, 2, 3]])
    first = model.generate(prompt, 12, temperature=1.0, seed=3)
    assert torch.equal(first, model.generate(prompt, 12, temperature=1.0, seed=3))
    assert not torch.equal(first, model.generate(prompt, 12, temperature=1.0, seed=4))


def test_eos_stops_and_pads():
    model = _trained_like("dyt")
    prompt = torch.tensor([[4, 8, 15], [16, 23, 42]])
    free = model.generate(prompt, 6)
    eos = int(free[0, 4])  # the second token sequence 0 generates
    out = model.generate(prompt, 6, eos_token_id=eos)
    for row in range(2):
        new = out[row, 3:].tolist()
        if eos in new:
            first = new.index(eos)
            assert all(t == eos for t in new[first:])
            assert new[:first] == free[row, 3:3 + first].tolist()
    assert eos in out[0, 3:].tolist()


def test_prompt_too_long_is_refused():
    model = _trained_like("pre_norm")
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(torch.zeros(1, 40, dtype=torch.long), max_new_tokens=10)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    import os

    from normlab.config import RunConfig
    from normlab.train.trainer import run_config, train

    root = tmp_path_factory.mktemp("gen")
    os.environ.setdefault("NORMLAB_CACHE", str(root / "cache"))
    run = root / "run"
    raw = RunConfig.load(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
                                "train.batch_size=2", "train.seq_len=32", "train.max_steps=2",
                                "train.warmup_steps=0", "train.eval_every=2", "train.eval_batches=1"])
    train(run_config(raw), run, progress=False)
    return run


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "normlab.cli", "generate", *map(str, args)],
                          capture_output=True, text=True)


def test_generate_cli_streams_the_greedy_continuation(byte_run):
    from normlab.train.saved import load_run

    saved = load_run(byte_run)
    tokenizer = saved.tokenizer()
    prompt = "def f("
    ids = saved.model.generate(torch.tensor([tokenizer.encode(prompt)]), 12)
    result = _cli(byte_run, "--prompt", prompt, "--max-new-tokens", 12, "--temperature", 0, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(ids[0].tolist()) + "\n"
    sampled = [_cli(byte_run, "--prompt", prompt, "--max-new-tokens", 12, "--seed", 5).stdout for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].startswith(prompt)
    # no room left: the length is cut to what fits, with a note
    result = _cli(byte_run, "--prompt", "x" * 30, "--max-new-tokens", 12, "--temperature", 0)
    assert result.returncode == 0 and "generating 2 tokens" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--device", "gpu"], "--device: 'gpu' is not auto"),
    (["--prompt", "y" * 40], "--prompt: 40 tokens leave no room below max_seq_len=32"),
    (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
    (["--top-p", "1.5"], "--top-p in (0, 1]"),
])
def test_generate_cli_bad_input_exits_2(byte_run, args, message):
    result = _cli(byte_run, *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_left_padded_prompts_generate_as_each_alone():
    model = _trained_like("bhyt")
    short, long = torch.tensor([[5, 9, 2]]), torch.tensor([[7, 1, 3, 8, 4, 6]])
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model.generate(batch, 7, attention_mask=mask)
    assert torch.equal(out[0, 6:], model.generate(short, 7)[0, 3:])
    assert torch.equal(out[1], model.generate(long, 7)[0])


@pytest.mark.parametrize("args,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--seed", "99999999999999999999999"], "--seed: 99999999999999999999999 is outside 0..18446744073709551615"),
    (["--seed", "18446744073709551615", "--num-samples", "2"], "--seed: 18446744073709551615 + 2 samples goes past 18446744073709551615"),
])
def test_generate_rejects_nan_temperature_and_seeds_out_of_range(byte_run, args, message, capsys):
    """The CLI's main in this process: one line, exit status 2."""
    from normlab.cli import main

    assert main(["generate", str(byte_run), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_run_whose_config_no_longer_fits_its_weights_is_one_line(byte_run, tmp_path, capsys):
    """config.yaml edited (another width) or garbled: every verb that loads the run says so in one
    line, exit status 2, instead of load_state_dict's list of size mismatches or a YAML traceback."""
    import shutil

    from normlab.cli import main

    run = tmp_path / "run"
    shutil.copytree(byte_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("d_model: 32", "d_model: 64"))
    for verb in (["generate", str(run), "--prompt", "x"], ["export-hf", str(run), str(tmp_path / "hf")]):
        assert main(verb) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "weights do not fit the model's config, e.g." in err, err
        assert "32) there and (" in err and "64) in the model" in err
    config.write_text(":::: [\n")
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"normlab: error: config file '{config}' line 2: invalid YAML\n"
