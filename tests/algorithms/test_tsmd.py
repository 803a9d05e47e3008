"""Eq. 8 scoring: query images are classified with support-set statistics, one by one."""
from __future__ import annotations

import pytest
import torch

from tsmd_ray.algorithms import InnerSettings, make_kd_loss, parameters_of, query_logits, run_task

from .helpers import random_tasks, tiny_pair


def _adapted_logits(statistics: str, query_x: torch.Tensor) -> torch.Tensor:
    teacher, student = tiny_pair()
    tasks = random_tasks(1)
    settings = InnerSettings(steps=2, alpha=0.3, lam=0.2, adapt_teacher=True, query_statistics=statistics)
    _, psi_task, theta_task = run_task(teacher, student, make_kd_loss("kl"), settings, parameters_of(teacher),
                                       parameters_of(student), tasks.support_x[0], tasks.support_y[0],
                                       tasks.query_x[0], tasks.query_y[0])
    return torch.stack([query_logits(model, params, tasks.support_x[0], query_x, statistics)
                        for model, params in ((teacher, psi_task), (student, theta_task))])


def test_a_query_prediction_does_not_depend_on_the_other_query_images():
    query = random_tasks(1).query_x[0]
    changed = query.clone()
    changed[1:] = torch.randn_like(changed[1:]) * 3 + 1  # every other query image replaced
    alone = query[:1]
    logits = [_adapted_logits("support", x)[:, 0] for x in (query, changed, alone)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits[0], logits[2], rtol=1e-10, atol=1e-12)


def test_transductive_statistics_do_depend_on_the_other_query_images():
    query = random_tasks(1).query_x[0]
    changed = query.clone()
    changed[1:] = torch.randn_like(changed[1:]) * 3 + 1
    first = [_adapted_logits("transductive", x)[:, 0] for x in (query, changed)]
    assert not torch.allclose(first[0], first[1])


@pytest.mark.parametrize("statistics", ["support", "transductive"])
def test_run_task_scores_the_query_with_the_chosen_statistics(statistics):
    teacher, student = tiny_pair()
    tasks = random_tasks(1)
    settings = InnerSettings(steps=2, alpha=0.3, lam=0.2, adapt_teacher=True, query_statistics=statistics)
    metrics, _, theta_task = run_task(teacher, student, make_kd_loss("kl"), settings, parameters_of(teacher),
                                      parameters_of(student), tasks.support_x[0], tasks.support_y[0],
                                      tasks.query_x[0], tasks.query_y[0])
    logits = query_logits(student, theta_task, tasks.support_x[0], tasks.query_x[0], statistics)
    expected = torch.nn.functional.cross_entropy(logits, tasks.query_y[0])
    torch.testing.assert_close(metrics["student/loss"], expected)
