"""The verdicts of benchmarks/bench_ceilings.py, on made-up measurements (the GPU run itself is in RESULTS.md)."""

from benchmarks.bench_ceilings import TARGETS, evaluate, gptq_bytes


def test_gptq_bytes_counts_codes_scales_and_x():
    # 4-bit 4096 x 4096 g128: 8 MiB of codes, 32 x 4096 fp16 scales, one fp16 row of x
    assert gptq_bytes(4, 4096, 4096, 1) == 4096 * 4096 // 2 + 32 * 4096 * 2 + 4096 * 2
    assert gptq_bytes(3, 256, 64, 16) == 256 * 64 * 3 // 8 + 2 * 64 * 2 + 16 * 256 * 2


def _measurements(k, n, t_fp16, read_rate, fixed):
    """fp16 times per M and reader floors of the form fixed + bytes / read_rate."""
    fp16 = {(k, n, m): (t_fp16[m], float("nan")) for m in {t[2] for t in TARGETS}}
    floors = {}
    for _, bits, m, _ in TARGETS:
        nb = gptq_bytes(bits, k, n, m)
        floors[k, n, nb] = {"reader": fixed + nb / read_rate}
    return fp16, floors


def test_verdicts_separate_fixed_costs_from_rates():
    k = n = 4096
    rate = 3e12
    # M = 1: fp16 reads 2KN bytes at the same rate as the readers, plus the same fixed cost
    t1 = 2e-6 + (2 * k * n + 2 * k) / rate
    t_fp16 = {1: t1, 16: t1, 64: t1, 256: 20e-6, 2048: 100e-6}
    fp16, floors = _measurements(k, n, t_fp16, rate, fixed=2e-6)
    res = evaluate(fp16, floors, f_max=700e12, bw={"torch_copy_TBps": 3.0})
    by = {r["target"]: r for r in res["rows"]}
    # t1 = 13.2 us. The fastest rate seen is the fp16 GEMV's (its fixed cost spreads over the most bytes).
    assert abs(res["read_rate_max"] / ((2 * k * n + 2 * k) / t1) - 1) < 1e-9
    # 4-bit M = 1: budget t1 / 3.5 = 3.8 us; the reader takes 2 + 2.9 us; 8.7 MB at the fastest rate 3.4 us
    assert by["M = 1 >= 3.5x"]["feasible"] == "only without fixed costs"
    # 8-bit M = 1: budget 7.3 us; the reader 2 + 5.7 us; 17.1 MB at the fastest rate 6.7 us
    assert by["8-bit M = 1 >= 1.8x"]["feasible"] == "only without fixed costs"
    # M = 2048: budget 111 us; 2 * 2048 * 4096^2 flops at 700 TFLOP/s 98 us
    assert by["M = 2048 >= 0.9x"]["feasible"] == "yes"
    # M = 256: budget 16.7 us; compute 12.3 us, reader 2 + 3.5 us
    assert by["M = 256 >= 1.2x"]["feasible"] == "yes"
    # budgets below even the compute floor are "no"
    fp16[k, n, 2048] = (60e-6, float("nan"))
    res = evaluate(fp16, floors, f_max=700e12, bw={})
    row = next(r for r in res["rows"] if r["target"] == "M = 2048 >= 0.9x")
    assert row["feasible"] == "no" and row["best_possible_ratio"] < 0.9
