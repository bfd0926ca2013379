"""Wasserstein dependency measure between teacher and student representations of the same input.

Ozair, Lynch, Bengio, van den Oord, Levine, Sermanet (2019), "Wasserstein Dependency Measure for
Representation Learning", NeurIPS 2019, arXiv:1903.11780.

The WDM replaces the KL divergence of mutual information by the Wasserstein distance,
``I_W(T; S) = W_1(p(t, s), p(t) p(s)) = sup_{||f||_L <= 1} E_{p(t,s)} f - E_{p(t)p(s)} f``. As KD,
the joint samples are the teacher and student rows of the same input ``(t_i, s_i)`` and the
product of marginals the other-in-batch pairs ``(t_i, s_j)``, ``j != i``. The paper's practical
estimator (Wasserstein predictive coding) keeps the contrastive InfoNCE bound of CPC and makes the
critic Lipschitz with the GAN tools (spectral normalisation or a gradient penalty).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from kd_lightning.losses.base import FeatureLoss, positive
from kd_lightning.outputs import ModelOutputs

Bound = Literal["infonce", "dual"]
Constraint = Literal["spectral_norm", "gradient_penalty"]

#: slope of the critics' LeakyReLU (1-Lipschitz for any slope in [0, 1]).
LEAKY_SLOPE = 0.2


# ---- the bounds, from the (teacher rows x student rows) score matrix --------------------------------
def infonce_bound(scores: Tensor, symmetric: bool = False) -> Tensor:
    """InfoNCE (CPC) bound from ``scores[i, j] = f(t_i, s_j)``, ``n x n``:

    ``I = 1/n sum_i [F_ii - log(1/n sum_j exp F_ij)]`` (each teacher row picks its student row
    among the batch's); ``symmetric`` averages it with the student-anchored form (columns). At most
    ``log n``; 0 for ``n <= 1``.
    """
    n = scores.shape[0]
    if n == 0:
        return scores.sum()
    log_n = math.log(n)
    diagonal = scores.diagonal()
    rows = (diagonal - torch.logsumexp(scores, dim=1)).mean() + log_n
    if not symmetric:
        return rows
    columns = (diagonal - torch.logsumexp(scores, dim=0)).mean() + log_n
    return (rows + columns) / 2


def dual_bound(scores: Tensor) -> Tensor:
    """Kantorovich-Rubinstein form of the WDM from ``scores[i, j] = f(t_i, s_j)``:
    ``1/n sum_i F_ii - 1/(n (n - 1)) sum_{i != j} F_ij`` (joint minus product of marginals); 0 for
    ``n <= 1`` (no marginal pair)."""
    n = scores.shape[0]
    if n < 2:
        return scores.sum() * 0.0
    joint = scores.diagonal().mean()
    marginal = (scores.sum() - scores.diagonal().sum()) / (n * (n - 1))
    return joint - marginal


def interpolates(teacher: Tensor, student: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Points between joint and marginal samples, where the gradient penalty is taken (WGAN-GP).

    Pair ``i`` keeps ``t_i`` and mixes its own student row with another's:
    ``s_hat_i = e_i s_i + (1 - e_i) s_{(i + k) mod n}``, ``e_i ~ U(0, 1)``, one shift
    ``k ~ U{1..n-1}`` per call (so no row is paired with itself). Needs ``n >= 2``.
    """
    n = student.shape[0]
    shift = int(torch.randint(1, n, (1,), generator=generator))
    mix = torch.rand(n, 1, generator=generator, dtype=student.dtype).to(student.device)
    return teacher, mix * student + (1 - mix) * student.roll(-shift, dims=0)


def gradient_penalty(critic: nn.Module, teacher: Tensor, student: Tensor, target: float = 1.0) -> Tensor:
    """``1/n sum_i (||grad_{(t, s)} f(t_i, s_i)||_2 - target)^2`` at the given points.

    The points are detached: the penalty constrains the critic only, never moves the features.
    """
    t = teacher.detach().requires_grad_(True)
    s = student.detach().requires_grad_(True)
    with torch.enable_grad():
        values = critic(t, s)
        grad_t, grad_s = torch.autograd.grad(values.sum(), (t, s), create_graph=True)
    norms = torch.cat([grad_t, grad_s], dim=-1).norm(dim=-1)
    return (norms - target).square().mean()


# ---- critics --------------------------------------------------------------------------------------
def _linear(width_in: int, width_out: int, lipschitz: bool, power_iterations: int) -> nn.Linear:
    layer = nn.Linear(width_in, width_out)
    return spectral_norm(layer, n_power_iterations=power_iterations) if lipschitz else layer


class JointCritic(nn.Module):
    """``f(t, s) = K * MLP([t; s])``: LeakyReLU MLP on the concatenated pair, one score per pair.

    With spectral normalisation every layer has spectral norm <= 1 and the activation is
    1-Lipschitz, so ``f`` is ``K``-Lipschitz in ``(t, s)`` jointly — the WDM's constraint. The
    all-pairs scores cost ``n^2 x hidden`` memory: meant for pooled rows (``cls``, ``mean``).
    """

    def __init__(
        self, width_t: int, width_s: int, hidden: int, layers: int, lipschitz: bool, power_iterations: int, scale: float
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(
                "JointCritic needs at least one hidden layer (layers >= 1): a linear critic scores pairs additively"
            )
        widths = [width_t + width_s] + [hidden] * layers + [1]
        self.layers = nn.ModuleList(
            _linear(a, b, lipschitz, power_iterations) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.width_t = width_t
        self.scale = scale

    def _head(self, h: Tensor) -> Tensor:
        for layer in self.layers[1:]:
            h = layer(F.leaky_relu(h, LEAKY_SLOPE))
        return self.scale * h.squeeze(-1)

    def forward(self, teacher: Tensor, student: Tensor) -> Tensor:
        """``f(t_i, s_i)`` for each row ``i``: ``(n,)``."""
        return self._head(self.layers[0](torch.cat([teacher, student], dim=-1)))

    def pairwise(self, teacher: Tensor, student: Tensor) -> Tensor:
        """``f(t_i, s_j)`` for every pair: ``(n_t, n_s)``. The first layer splits over ``[t; s]``."""
        first = self.layers[0]
        weight = first.weight  # one access: one power iteration in training mode
        from_t = teacher @ weight[:, : self.width_t].T
        from_s = student @ weight[:, self.width_t :].T + first.bias
        return self._head(from_t[:, None, :] + from_s[None, :, :])


class SeparableCritic(nn.Module):
    """``f(t, s) = K * <g(t), h(s)>`` with ``g``, ``h`` LeakyReLU MLPs (``layers`` hidden layers).

    All-pairs scores are one ``n x n`` matrix product, cheap enough for token rows. Spectral
    normalisation makes ``g`` and ``h`` 1-Lipschitz; ``f`` is then Lipschitz on bounded inputs
    (``|f(t, s) - f(t', s')| <= K (||g(t)|| ||s - s'|| + ||h(s')|| ||t - t'||)``), not globally:
    use :class:`JointCritic` or the gradient penalty for the exact constraint.
    """

    def __init__(
        self,
        width_t: int,
        width_s: int,
        hidden: int,
        layers: int,
        lipschitz: bool,
        power_iterations: int,
        scale: float,
        embedding: int,
    ) -> None:
        super().__init__()
        self.teacher_map = self._mlp(width_t, hidden, layers, embedding, lipschitz, power_iterations)
        self.student_map = self._mlp(width_s, hidden, layers, embedding, lipschitz, power_iterations)
        self.scale = scale

    @staticmethod
    def _mlp(width: int, hidden: int, layers: int, out: int, lipschitz: bool, power_iterations: int) -> nn.Sequential:
        widths = [width] + [hidden] * layers + [out]
        modules: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            if modules:
                modules.append(nn.LeakyReLU(LEAKY_SLOPE))
            modules.append(_linear(a, b, lipschitz, power_iterations))
        return nn.Sequential(*modules)

    def forward(self, teacher: Tensor, student: Tensor) -> Tensor:
        return self.scale * (self.teacher_map(teacher) * self.student_map(student)).sum(-1)

    def pairwise(self, teacher: Tensor, student: Tensor) -> Tensor:
        return self.scale * self.teacher_map(teacher) @ self.student_map(student).T


class WassersteinDependency(FeatureLoss):
    """Wasserstein dependency measure KD (Ozair et al., NeurIPS 2019, arXiv:1903.11780).

    Rows ``t_i`` (teacher tap) and ``s_i`` (student tap) of the same input are the joint samples;
    ``(t_i, s_j)``, ``j != i``, the product of marginals. With ``F_ij = f(t_i, s_j)`` from a
    Lipschitz critic ``f`` (student-side: trained with the student, saved with it):

    - ``bound="infonce"`` (the paper's Wasserstein predictive coding):
      ``I = 1/n sum_i [F_ii - log(1/n sum_j exp F_ij)]`` (``symmetric`` also averages the
      student-anchored form);
    - ``bound="dual"`` (the Kantorovich-Rubinstein dual itself):
      ``I = 1/n sum_i F_ii - 1/(n (n-1)) sum_{i != j} F_ij``.

    The loss is ``-I``: the student and the critic both maximise the bound. With
    ``constraint="gradient_penalty"`` the loss is ``-I + lambda * 1/n sum_i (||grad f(t_hat_i,
    s_hat_i)||_2 - K)^2`` at points between joint and marginal pairs (:func:`interpolates`, inputs
    detached, so the penalty trains the critic only); with ``"spectral_norm"`` (default) every
    critic layer is spectrally normalised (one power iteration per step, ``torch.nn.utils.
    parametrizations.spectral_norm``) and the loss is ``-I``.

    ``normalize`` (default) scales every row to unit length first. The paper's Lipschitz
    constraint covers its encoder; here the encoder is the student, which nothing constrains, and
    it could raise the bound by spreading its features out: on the unit sphere it cannot.

    Args:
        student, teacher: the tap names (rows of the same examples: ``cls``/``mean`` for the
            joint critic; ``tokens`` works with the separable one).
        bound: ``infonce`` or ``dual``.
        critic: ``joint`` (``f = K * MLP([t; s])``, exactly ``K``-Lipschitz under spectral
            normalisation; ``n^2`` pair activations) or ``separable`` (``f = K * <g(t), h(s)>``).
        hidden: width of the critic's hidden layers.
        layers: hidden layers of the critic's MLP(s) (>= 1 for ``joint``, >= 0 for ``separable``).
        embedding: output width of ``g`` and ``h`` (separable critic).
        constraint: ``spectral_norm`` or ``gradient_penalty``.
        lipschitz_constant: ``K``, the Lipschitz constant the constraint targets (1 in the paper).
        penalty_weight: ``lambda`` of the gradient penalty (10, as in WGAN-GP).
        power_iterations: power-iteration steps per forward pass of each spectral norm.
        symmetric: average the teacher- and student-anchored InfoNCE bounds.
        normalize: L2-normalise the rows before the critic.
        weight, name: see :class:`~kd_lightning.losses.base.DistillLoss`.
    """

    def __init__(
        self,
        student: str,
        teacher: str,
        bound: Bound = "infonce",
        critic: Literal["joint", "separable"] = "joint",
        hidden: int = 256,
        layers: int = 1,
        embedding: int = 128,
        constraint: Constraint = "spectral_norm",
        lipschitz_constant: float = 1.0,
        penalty_weight: float = 10.0,
        power_iterations: int = 1,
        symmetric: bool = False,
        normalize: bool = True,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(student, teacher, weight=weight, name=name)
        owner = type(self).__name__
        for argument, value, allowed in (
            ("bound", bound, ("infonce", "dual")),
            ("critic", critic, ("joint", "separable")),
            ("constraint", constraint, ("spectral_norm", "gradient_penalty")),
        ):
            if value not in allowed:
                raise ValueError(
                    f"{owner}: {argument} must be one of {allowed}, got {value!r}; set init_args.{argument}"
                )
        if symmetric and bound != "infonce":
            raise ValueError(
                f"{owner}: symmetric applies to bound 'infonce' only; remove symmetric or use bound: infonce"
            )
        if layers < (1 if critic == "joint" else 0):
            raise ValueError(
                f"{owner}: the {critic} critic needs layers >= {1 if critic == 'joint' else 0}, got {layers}"
            )
        if power_iterations < 1:
            raise ValueError(f"{owner}: power_iterations must be >= 1, got {power_iterations}")
        self.bound, self.critic_kind, self.constraint = bound, critic, constraint
        self.hidden, self.layers, self.embedding = int(hidden), int(layers), int(embedding)
        self.lipschitz_constant = positive(lipschitz_constant, "lipschitz_constant", owner)
        self.penalty_weight = float(penalty_weight)
        self.power_iterations = int(power_iterations)
        self.symmetric, self.normalize = symmetric, normalize
        self.critic: JointCritic | SeparableCritic | None = None

    def build(self, tap_widths: Mapping[str, int], num_labels: int) -> None:
        width_t, width_s = tap_widths[self.teacher_tap], tap_widths[self.student_tap]
        lipschitz = self.constraint == "spectral_norm"
        args = (width_t, width_s, self.hidden, self.layers, lipschitz, self.power_iterations, self.lipschitz_constant)
        self.critic = JointCritic(*args) if self.critic_kind == "joint" else SeparableCritic(*args, self.embedding)

    def critic_layers(self) -> Iterator[nn.Linear]:
        """The critic's linear layers (spectrally normalised under ``constraint="spectral_norm"``)."""
        if self.critic is None:
            raise RuntimeError(f"loss {self.name!r} is not built: DistillModule calls build() with the tap widths")
        return (m for m in self.critic.modules() if isinstance(m, nn.Linear))

    def rows(self, student: ModelOutputs, teacher: ModelOutputs) -> tuple[Tensor, Tensor]:
        """The ``(teacher, student)`` rows the critic sees (normalised when ``normalize``)."""
        s, t = self.feature_pair(student, teacher)
        if self.normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        return t, s

    def dependency(self, teacher_rows: Tensor, student_rows: Tensor) -> Tensor:
        """The bound ``I`` on these rows (without any penalty)."""
        scores = self.critic.pairwise(teacher_rows, student_rows)
        return infonce_bound(scores, self.symmetric) if self.bound == "infonce" else dual_bound(scores)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Mapping[str, Any]) -> Tensor:
        if self.critic is None:
            raise RuntimeError(f"loss {self.name!r} is not built: DistillModule calls build() with the tap widths")
        t, s = self.rows(student, teacher)
        t, s = t.to(self._dtype()), s.to(self._dtype())
        loss = -self.dependency(t, s)
        if self.constraint == "gradient_penalty" and s.shape[0] >= 2 and self.penalty_weight > 0:
            loss = loss + self.penalty_weight * gradient_penalty(
                self.critic, *interpolates(t, s), self.lipschitz_constant
            )
        return loss

    def _dtype(self) -> torch.dtype:
        return next(self.critic.parameters()).dtype

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, bound={self.bound!r}, critic={self.critic_kind!r}, constraint={self.constraint!r}, "
            f"K={self.lipschitz_constant}"
        )
