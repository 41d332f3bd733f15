"""scripts/bench_serve.py's options and workloads: --lengths picks uniform ranges (the default) or
ShareGPT-like log-normals, drawn from a fixed seed, with the means and spread they are defined
by and clipped to the context."""
import statistics

import pytest

from bench_serve import SHAREGPT, make_sharegpt_workload, parse_args


def test_lengths_option():
    assert parse_args([]).lengths == "uniform"
    args = parse_args(["--lengths", "sharegpt", "--quick"])
    assert (args.lengths, args.requests) == ("sharegpt", 64)
    assert parse_args(["--lengths", "sharegpt"]).requests == 256
    with pytest.raises(SystemExit):
        parse_args(["--lengths", "zipf"])


def test_sharegpt_workload_is_fixed_by_its_seed_and_fits_the_context():
    work = make_sharegpt_workload(300, 50, 256, seed=0)
    assert work == make_sharegpt_workload(300, 50, 256, seed=0)
    assert work != make_sharegpt_workload(300, 50, 256, seed=1)
    for prompt, n in work:
        assert SHAREGPT["min_len"] <= len(prompt) <= 128 and SHAREGPT["min_len"] <= n <= 256 - len(prompt)
        assert all(0 <= t < 50 for t in prompt)
    assert any(n == 256 - len(prompt) for prompt, n in work)  # the tail reaches the clip


def test_sharegpt_lengths_follow_the_published_means_with_a_heavy_tail():
    # A context of 8 x 2,048 scales the means 8x and leaves almost nothing to clip.
    work = make_sharegpt_workload(1000, 2, 8 * SHAREGPT["context"], seed=0)
    for lengths, mean in (([len(p) for p, _ in work], 8 * SHAREGPT["prompt_mean"]),
                          ([n for _, n in work], 8 * SHAREGPT["output_mean"])):
        assert statistics.mean(lengths) == pytest.approx(mean, rel=0.1)
        assert statistics.median(lengths) == pytest.approx(0.61 * mean, rel=0.1)  # exp(-sigma^2 / 2)
        assert max(lengths) > 5 * mean
    # --quick's half scale halves them.
    half = make_sharegpt_workload(1000, 2, 8 * SHAREGPT["context"], seed=0, scale=0.5)
    assert statistics.mean(n for _, n in half) == pytest.approx(4 * SHAREGPT["output_mean"], rel=0.1)

