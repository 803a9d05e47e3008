"""KD losses: values they must take, and smooth second derivatives."""
import torch

from tsmd_ray.algorithms import Outputs, hinton_kl, make_kd_loss, relational_kd


def _out(logits=None, embedding=None):
    return Outputs(logits, embedding)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(6, 5)
    assert hinton_kl(_out(logits), _out(logits)).abs() < 1e-6
    assert hinton_kl(_out(logits), _out(logits.flip(1))) > 0


def test_kl_matches_torch_kl_div_times_t_squared():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s / 3, -1), torch.log_softmax(t / 3, -1),
                                          reduction="batchmean", log_target=True) * 9
    torch.testing.assert_close(hinton_kl(_out(s), _out(t), temperature=3.0), expected)


def test_rkd_is_invariant_to_scale_translation_and_dimension():
    e = torch.randn(7, 4, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))[0][:, :4]
    teacher = 3.0 * e @ rotation.T + 1.5  # same relations in 9 dimensions
    assert relational_kd(_out(embedding=e), _out(embedding=teacher)) < 1e-10
    assert relational_kd(_out(embedding=e), _out(embedding=torch.randn(7, 9, dtype=torch.float64))) > 1e-3


def test_rkd_has_second_derivatives():
    e = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 6, dtype=torch.float64)
    f = lambda x: relational_kd(_out(embedding=x), _out(embedding=t))  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (e,))


def test_registry_binds_only_accepted_settings():
    loss = make_kd_loss("kl", temperature=1.0, distance_weight=3.0)
    logits = torch.randn(3, 4)
    torch.testing.assert_close(loss(_out(logits), _out(logits.flip(1))),
                               hinton_kl(_out(logits), _out(logits.flip(1)), temperature=1.0))


def _finite_to_second_order(student: torch.Tensor, teacher: torch.Tensor) -> None:
    e = student.clone().requires_grad_()
    loss = relational_kd(_out(embedding=e), _out(embedding=teacher))
    (grad,) = torch.autograd.grad(loss, e, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), e)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and torch.isfinite(second).all()


def test_rkd_is_finite_to_second_order_with_duplicated_embeddings():
    e = torch.randn(6, 4, dtype=torch.float64)
    e[3] = e[1]  # two identical images give identical embeddings
    t = torch.randn(6, 8, dtype=torch.float64)
    t[5] = t[0]
    _finite_to_second_order(e, t)
    _finite_to_second_order(t[:, :4].clone(), e)


def test_rkd_is_finite_to_second_order_with_all_zero_embeddings():
    zeros = torch.zeros(5, 3)  # a narrow ReLU student whose units are all dead
    _finite_to_second_order(zeros, torch.randn(5, 7))
    _finite_to_second_order(torch.randn(5, 3), torch.zeros(5, 7))
