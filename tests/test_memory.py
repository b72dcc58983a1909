"""The --dry-run memory estimate against the 7B run measured by bench/memory_7b.py (offline: known config, meta device)."""

from iqstar_lite.config import load_recipe
from iqstar_lite.models.load import load_model_config
from iqstar_lite.models.memory import GIB, estimate_memory

# bench/results/memory_7b-20261125-134704.json: laptop_7b (loss then defaulted to distill), 2 steps on this CPU, random weights
MEASURED_STEP_PEAK_GIB = 6.997
MEASURED_STATIC_GIB = {"weights": 3366408192 / GIB + 2180656128 / GIB}  # 4-bit layers + bf16 embeddings / head / norms
BENCH_OVERRIDES = [
    "model.device=cpu",
    "model.map_embeddings=false",
    "model.dtype=bf16",
    "loss.type=distill",
    "train.steps=2",
    "rollout.prompts_per_step=2",
    "rollout.max_new_tokens=16",
    "data.max_prompt_tokens=96",
]


def test_estimate_within_15_percent_of_the_measured_7b_step():
    cfg = load_recipe("laptop_7b", BENCH_OVERRIDES)
    est = estimate_memory(cfg, load_model_config(cfg.model.path))
    assert abs(est.peak / GIB - MEASURED_STEP_PEAK_GIB) / MEASURED_STEP_PEAK_GIB <= 0.15
    assert abs(est.parts["weights"] / GIB - MEASURED_STATIC_GIB["weights"]) < 0.01  # counted exactly, not fitted


def test_fp32_unquantized_parts_cost_two_more_gib():
    """152064 x 3584 x 2 matrices: 2 bytes more per parameter in fp32 = 2.03 GiB."""
    cfg = load_recipe("laptop_7b", BENCH_OVERRIDES)
    fp32 = load_recipe("laptop_7b", [*BENCH_OVERRIDES, "model.unquantized_dtype=fp32"])
    mc = load_model_config(cfg.model.path)
    extra = (estimate_memory(fp32, mc).parts["weights"] - estimate_memory(cfg, mc).parts["weights"]) / GIB
    assert abs(extra - 2 * 152064 * 3584 * 2 / GIB) < 0.01


# bench/results/memory_7b-20261128-085415.json / -090851.json: the same run with today's defaults (pg, input embeddings
# mapped, update-scoped mallopt): 5.55 / 5.70 / 5.79 GiB
MEASURED_MAPPED_STEP_PEAK_GIB = 5.702


def test_estimate_within_15_percent_of_the_measured_7b_step_with_mapped_embeddings():
    cfg = load_recipe(
        "laptop_7b", [o for o in BENCH_OVERRIDES if o not in ("model.map_embeddings=false", "loss.type=distill")]
    )
    est = estimate_memory(cfg, load_model_config(cfg.model.path))
    assert abs(est.peak / GIB - MEASURED_MAPPED_STEP_PEAK_GIB) / MEASURED_MAPPED_STEP_PEAK_GIB <= 0.15


def test_mapped_input_embeddings_leave_the_estimate_on_cpu_only():
    """map_embeddings (CPU, untied, stored as bf16 = used as bf16): the 152064 x 3584 bf16 input table is not resident."""
    mapped = load_recipe("laptop_7b", [o for o in BENCH_OVERRIDES if o != "model.map_embeddings=false"])
    plain = load_recipe("laptop_7b", BENCH_OVERRIDES)
    mc = load_model_config(plain.model.path)
    saved = (estimate_memory(plain, mc).parts["weights"] - estimate_memory(mapped, mc).parts["weights"]) / GIB
    assert abs(saved - 152064 * 3584 * 2 / GIB) < 1e-6
    fp32 = load_recipe(
        "laptop_7b",
        [o for o in BENCH_OVERRIDES if o != "model.map_embeddings=false"] + ["model.unquantized_dtype=fp32"],
    )
    fp32_plain = load_recipe("laptop_7b", [*BENCH_OVERRIDES, "model.unquantized_dtype=fp32"])
    assert (
        estimate_memory(fp32, mc).parts["weights"] == estimate_memory(fp32_plain, mc).parts["weights"]
    )  # file is bf16: not mapped
    gpu = load_recipe("laptop_7b", [])
    gpu_plain = load_recipe("laptop_7b", ["model.map_embeddings=false"])
    assert estimate_memory(gpu, mc).peak == estimate_memory(gpu_plain, mc).peak
