"""The FLOPs of a DPO step (analysis/flops.py: dpo_step_flops) against independent counts: the
dot_general equations of the jitted DPO step's program in both layouts (dead code dropped, as
the compiler does), the attention pairs of the masks counted one by one (a segment rule
written here, and the kernels' own on the data pipeline's row), and a hand count of the
reference forward; and the saving of the shared-prefix layout over the separate one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spmd_lora.analysis import flops
from spmd_lora.config.lora_config import LoraConfig
from spmd_lora.config.model_config import ModelConfig, resolve_model_config
from spmd_lora.data.examples import make_example
from spmd_lora.data.preference import Pair
from spmd_lora.engine.step import make_train_step
from spmd_lora.kernels._masks import segments_visible
from spmd_lora.model import ForwardOptions, PreferenceLoss
from spmd_lora.parallel.mesh import make_mesh
from spmd_lora.weights.lora import init_lora
from spmd_lora.weights.shapes import random_params

CFG = ModelConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32)


def _program_flops(opts, pref, rows=None, seq=None, batch=None):
    """Matmul FLOPs of the jitted DPO step's program on a [1, rows, seq] batch (or ``batch``:
    raw fields [A, B, S])."""
    mesh = make_mesh(1, 1)
    params = random_params(CFG, mesh, "float32")
    lora = init_lora(CFG, opts.lora, jax.random.key(0))
    opt = optax.sgd(1e-3)
    step = make_train_step(opts, mesh, opt, preference=pref)
    if batch is None:
        batch = {"tokens": jnp.zeros((1, rows, seq), jnp.int32),
                 "loss_mask": jnp.ones((1, rows, seq), jnp.int32)}
    jaxpr = jax.make_jaxpr(step)(params, lora, opt.init(lora), batch, jax.random.key(0))
    return flops.jaxpr_matmul_flops(jaxpr)


def _pair(prompt, chosen, rejected):
    """A tokenized pair as data/preference.py makes it: BOS + prompt (``prompt`` tokens), each
    answer + EOS (``chosen`` / ``rejected`` tokens)."""
    rng = np.random.default_rng(prompt + chosen + rejected)
    head = list(rng.integers(3, 1000, prompt))
    rows = []
    for n in (chosen, rejected):
        ids = head + list(rng.integers(3, 1000, n))
        rows.append(make_example(ids, [0] * prompt + [1] * n, "test"))
    return Pair(rows[0], rows[1], prompt, "test", shared_prefix=True)


@pytest.mark.parametrize("remat,targets", [("none", "all"), ("full", ("q_proj", "down_proj")),
                                           ("offload-input", "all")])
def test_shared_prefix_hardware_flops_match_the_program(remat, targets):
    """The shared-prefix step (PreferenceLoss shared_prefix, one row per pair with branch
    segment ids, data/preference.py's row) against its program: the row's matmuls whole
    (xla attention computes the square; the masks are data)."""
    p, c, r = 40, 17, 24
    lc = LoraConfig(rank=4, alpha=8.0, targets=targets)
    opts = ForwardOptions(cfg=CFG, tp=1, lora=lc, attention_impl="xla", remat=remat)
    row = _pair(p, c, r).shared_row()
    assert (1, len(row["tokens"])) == flops.dpo_rows(p, c, r)
    batch = {k: jnp.asarray(v)[None, None] for k, v in row.items()}
    counted = _program_flops(opts, PreferenceLoss(shared_prefix=True), batch=batch)
    expected = flops.dpo_step_flops(CFG, p, c, r, lora_rank=4, lora_targets=lc.targets,
                                    remat=remat, attention="xla")
    assert counted == expected.hardware, (counted, expected.as_dict())


@pytest.mark.parametrize("remat,targets,prompt,chosen,rejected,pairs", [
    ("none", "all", 40, 24, 24, 1),
    ("full", ("q_proj", "down_proj"), 40, 17, 24, 1),   # the shorter row padded
    ("offload", "all", 33, 9, 9, 2),
    ("save-dots", ("v_proj",), 20, 12, 30, 1),
])
def test_separate_layout_hardware_flops_match_the_program(remat, targets, prompt, chosen,
                                                          rejected, pairs):
    lc = LoraConfig(rank=4, alpha=8.0, targets=targets)
    opts = ForwardOptions(cfg=CFG, tp=1, lora=lc, attention_impl="xla", remat=remat)
    rows, seq = flops.dpo_rows(prompt, chosen, rejected, "separate")
    counted = _program_flops(opts, PreferenceLoss(), rows * pairs, seq)
    expected = flops.dpo_step_flops(CFG, prompt, chosen, rejected, pairs, layout="separate",
                                    lora_rank=4, lora_targets=lc.targets, remat=remat,
                                    attention="xla")
    assert counted == expected.hardware, (counted, expected.as_dict())
    if chosen != rejected:
        assert expected.policy.padding > 0 and expected.reference.padding > 0


def test_reference_forward_hand_count():
    # 2 layers, D=128, F=344, 4 heads x 32 (2 kv heads), V=1000; one row of 64 tokens, the
    # exact causal triangle: no LoRA, no backward, the LM head's forward only
    t = 64
    w = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 344
    linears = 2 * 2 * t * w
    head = 2 * t * 128 * 1000
    attn = 2 * (2 * 2 * 64 * 64 * 32 * 4 / 2)
    f = flops.forward_flops(CFG, 64, attention="causal")
    assert (f.linears, f.lm_head, f.lora, f.attention) == (linears, head, 0, attn)
    assert f.hardware == f.useful and f.remat == 0


def _mask_pairs(segments):
    """Visible (query, key) pairs of one row, counted one by one: keys at or before the query
    (token index) and, by segment (0 the shared prompt, 1 and 2 the answers, -1 a plain row),
    in the query's own segment or in the prompt when the query is in an answer."""
    seg = np.asarray(segments)
    q, k = seg[:, None], seg[None, :]
    causal = np.tril(np.ones((seg.size, seg.size), bool))
    visible = (q == k) | ((q >= 1) & (k == 0))
    return int(np.sum(causal & visible))


@pytest.mark.parametrize("prompt,chosen,rejected", [(5, 3, 4), (40, 17, 24), (2, 1, 1),
                                                    (300, 60, 7)])
def test_attention_pairs_match_the_masks(prompt, chosen, rejected):
    rows, seq = flops.dpo_rows(prompt, chosen, rejected, "shared-prefix")
    segments = [0] * (prompt - 1) + [1] * (chosen + 1) + [2] * (rejected + 1)
    assert (rows, seq) == (1, len(segments))
    exact = _mask_pairs(segments)
    # the same count from the row the data pipeline builds and the kernels' own segment rule
    real = _pair(prompt, chosen, rejected).shared_row()["segment_ids"]
    visible = np.asarray(segments_visible(jnp.asarray(real), jnp.asarray(real)))
    assert int(np.sum(np.tril(visible))) == exact
    # the formula counts a causal block of n tokens as n**2 / 2: half a pair per token less
    assert flops.dpo_attention_pairs(prompt, chosen, rejected) + seq / 2 == exact
    sep = [_mask_pairs([-1] * (prompt + n)) for n in (chosen, rejected)]
    assert (flops.dpo_attention_pairs(prompt, chosen, rejected, "separate")
            + (2 * prompt + chosen + rejected) / 2 == sum(sep))
    # the shared row's masks let through exactly the separate rows' pairs, less the causal
    # triangle of the prefix's second copy (P - 1 tokens: the prompt's last token is in the
    # answers' segments in the shared row)
    assert sum(sep) - exact == prompt * (prompt - 1) // 2


def test_shared_prefix_step_is_the_row_step_with_the_masks_useful_pairs():
    """The shared-prefix row runs the same matmuls as a causal row of its length (the masks
    are data); only the useful attention differs, by the pairs the masks drop."""
    p, c, r = 40, 17, 24
    _, seq = flops.dpo_rows(p, c, r)
    kw = dict(lora_rank=4, remat="full", attention="xla")
    shared = flops.dpo_step_flops(CFG, p, c, r, **kw)
    plain = flops.step_flops(CFG, seq, **kw)
    ref = flops.forward_flops(CFG, seq, attention="xla")
    assert shared.hardware == plain.hardware + ref.hardware
    dropped = seq * seq / 2 - flops.dpo_attention_pairs(p, c, r)
    heads = 4.0 * CFG.num_heads * CFG.head_dim * CFG.num_layers
    assert plain.useful - shared.policy.useful == pytest.approx(3.5 * heads * dropped)
    assert ref.useful - shared.reference.useful == pytest.approx(heads * dropped)


def test_separate_useful_is_two_sft_rows_plus_their_reference():
    p, c, r = 100, 30, 50
    kw = dict(lora_rank=8, remat="offload-input", attention="blockwise", block_q=64, block_k=64)
    f = flops.dpo_step_flops(CFG, p, c, r, layout="separate", **kw)
    assert f.policy.useful == (flops.step_flops(CFG, p + c, **kw).useful
                               + flops.step_flops(CFG, p + r, **kw).useful)
    assert f.reference.useful == (flops.forward_flops(CFG, p + c).useful
                                  + flops.forward_flops(CFG, p + r).useful)
    # padding: the shorter row's 20 tokens through the linears, LM head (policy: forward and
    # input gradient) and LoRA
    w = sum(i * o for i, o in (flops.projection_dims(CFG, n) for n in flops.PROJECTIONS))
    assert f.reference.padding == 2 * 20 * (w * CFG.num_layers + 128 * 1000)


def test_shared_prefix_saving_for_llama3_8b_at_32k():
    """P = 32k prompt tokens, answers of 512: the prompt dominates, and the shared prefix
    does nearly half the work of two rows (each answer costs the same in both layouts)."""
    cfg = resolve_model_config("llama3-8b")
    s = flops.dpo_layout_saving(cfg, 32768, 512, 512, lora_rank=16, remat="full",
                                attention="blockwise")
    assert s["separate"]["tokens"] == 2 * (32768 + 512)
    assert s["shared-prefix"]["tokens"] == 32768 + 1024 + 1
    assert 0.48 < s["useful_saving"] < 0.5 and 0.47 < s["hardware_saving"] < 0.5
    # a short prompt saves little: the answers dominate
    short = flops.dpo_layout_saving(cfg, 64, 512, 512, lora_rank=16)
    assert 0 < short["useful_saving"] < 0.06


def test_bad_layout():
    with pytest.raises(ValueError, match="shared-prefix, separate"):
        flops.dpo_rows(10, 5, 5, "interleaved")
