import torch
from conftest import make_policy

from iqstar_lite.algorithm.reference import reference_mode
from iqstar_lite.algorithm.rollout import pack, response_logits
from iqstar_lite.algorithm.scoring import PassSettings, estimator_pass


def _gather(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)


def test_estimator_pass_is_the_two_reference_passes_with_or_without_shared_contexts(tiny_path):
    """estimator_pass = the reference (adapters off) scored with and without the principle, combined by hand:
    log pi* = log_softmax(2 z+ - z0) at alpha 1, r = beta (log pi* - log pi_ref), gap = log pi_ref(y|P,s) - log pi_ref(y|s).
    Sharing each prompt's prefill across its K samples changes nothing but rounding."""
    model = make_policy(tiny_path, quantize="nf4")
    plain = [[1, 40, 41], [1, 40, 41], [1, 50], [1, 50], [1, 60, 61, 62]]
    cond = [[1, 7, 8, 9, 40, 41], [1, 7, 8, 9, 40, 41], [1, 7, 8, 9, 50], [1, 7, 8, 9, 50], [1, 7, 8, 9, 60, 61, 62]]
    resp = torch.tensor([[11, 12, 13], [14, 15, 16], [17, 18, 19], [20, 21, 22], [23, 24, 25]])
    settings = PassSettings(alpha=1.0, beta=0.1, micro_batch=4)
    shared = estimator_pass(model, plain, cond, resp, 2, settings, keep_full=True)
    packed = estimator_pass(model, plain, cond, resp, 2, settings, keep_full=True, share_context=False)
    model.eval()
    with reference_mode(model):
        z_pos = response_logits(model, pack(cond, resp, 2), 3).float()
        z_neg = response_logits(model, pack(plain, resp, 2), 3).float()
    star = _gather(2 * z_pos - z_neg, resp)
    ref = _gather(z_neg, resp)
    for out in (shared, packed):
        torch.testing.assert_close(out["logp_star"], star, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["logp_ref"], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["rewards"], 0.1 * (star - ref), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["principle_gap"], _gather(z_pos, resp) - ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            out["logp_star_full"], torch.log_softmax(2 * z_pos - z_neg, -1), atol=1e-4, rtol=1e-4
        )


def test_estimator_pass_from_the_policy_keeps_rewards_relative_to_the_reference(tiny_path):
    """source='policy': pi* from the adapted model, log pi_ref (and so the rewards) still from the reference."""
    model = make_policy(tiny_path, quantize="none")
    plain = [[1, 40, 41], [1, 40, 41], [1, 50], [1, 50]]
    cond = [[1, 7, 8, 40, 41], [1, 7, 8, 40, 41], [1, 7, 8, 50], [1, 7, 8, 50]]
    resp = torch.tensor([[11, 12, 13], [14, 15, 16], [17, 18, 19], [20, 21, 22]])
    out = estimator_pass(model, plain, cond, resp, 2, PassSettings(alpha=1.0, beta=0.1, source="policy", micro_batch=4))
    model.eval()
    with torch.no_grad():
        z_pos = response_logits(model, pack(cond, resp, 2), 3).float()
        z_neg = response_logits(model, pack(plain, resp, 2), 3).float()
    with reference_mode(model):
        ref = _gather(response_logits(model, pack(plain, resp, 2), 3), resp)
    star = _gather(2 * z_pos - z_neg, resp)
    assert (ref - _gather(z_neg, resp)).abs().max() > 1e-3  # the adapters matter here
    torch.testing.assert_close(out["logp_ref"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["rewards"], 0.1 * (star - ref), atol=1e-5, rtol=1e-4)
