"""What a network predicts, as one small class per kind (EDM's preconditioning idea; DMD App. H): its conversion to
the x0 (mean) prediction, the target it is trained on, and the x0-space weight of its own loss (DMD Alg. 3).

`x_t = alpha_t x0 + sigma_t eps`; VP processes have alpha_t^2 + sigma_t^2 = 1 (the v formulas rely on it).
"""
from __future__ import annotations

import torch


class Parametrisation:
    """A network output `out` at (x_t, alpha_t, sigma_t): `to_x0(out, ...)`, `target(x0, eps, ...)`, `loss_weight`."""

    name: str = ""

    def to_x0(self, out: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, snr: torch.Tensor) -> torch.Tensor:
        """Weight in x0 space of this parametrisation's unit-weight MSE: |out - target|^2 = w |x0_hat - x0|^2."""
        raise NotImplementedError


class Eps(Parametrisation):
    """eps-prediction: x0 = (x_t - sigma_t eps) / alpha_t; |eps_hat - eps|^2 = SNR |x0_hat - x0|^2."""

    name = "epsilon"

    def to_x0(self, out, x_t, alpha_t, sigma_t):
        return (x_t - sigma_t * out) / alpha_t

    def target(self, x0, eps, alpha_t, sigma_t):
        return eps

    def loss_weight(self, snr):
        return snr


class V(Parametrisation):
    """v-prediction (Salimans & Ho 2022): v = alpha_t eps - sigma_t x0, x0 = alpha_t x_t - sigma_t v (VP);
    |v_hat - v|^2 = (SNR + 1) |x0_hat - x0|^2."""

    name = "v_prediction"

    def to_x0(self, out, x_t, alpha_t, sigma_t):
        return alpha_t * x_t - sigma_t * out

    def target(self, x0, eps, alpha_t, sigma_t):
        return alpha_t * eps - sigma_t * x0

    def loss_weight(self, snr):
        return snr + 1.0


class X0(Parametrisation):
    """x0-prediction (diffusers' "sample"): the output is x0; unit weight."""

    name = "sample"

    def to_x0(self, out, x_t, alpha_t, sigma_t):
        return out

    def target(self, x0, eps, alpha_t, sigma_t):
        return x0

    def loss_weight(self, snr):
        return torch.ones_like(snr)


class FlowVelocity(Parametrisation):
    """Flow velocity (rectified flow, x_t = (1 - sigma_t) x0 + sigma_t eps; SD3 Eq. 1-3): v = eps - x0,
    x0 = x_t - sigma_t v, no division by alpha. The velocity MSE |v_hat - v|^2 = |x0_hat - x0|^2 / sigma_t^2, so the
    x0-space weight is 1 / sigma_t^2 = (1 + sqrt(SNR))^2 with SNR = (1 - sigma_t)^2 / sigma_t^2: the flow-matching
    loss of diffusers' SD3 training script (weighting "none" on v; equally "sigma_sqrt" of
    `compute_loss_weighting_for_sd3` on preconditioned x0 outputs)."""

    name = "flow_prediction"

    def to_x0(self, out, x_t, alpha_t, sigma_t):
        return x_t - sigma_t * out

    def target(self, x0, eps, alpha_t, sigma_t):
        return eps - x0

    def loss_weight(self, snr):
        return (1.0 + snr.sqrt()) ** 2


PARAMETRISATIONS = {p.name: p for p in (Eps(), V(), X0(), FlowVelocity())}


def parametrisation(prediction_type: str) -> Parametrisation:
    """The parametrisation of a diffusers `prediction_type` (epsilon, v_prediction, sample, flow_prediction)."""
    if prediction_type not in PARAMETRISATIONS:
        raise ValueError(f"prediction_type must be one of {tuple(PARAMETRISATIONS)}, got {prediction_type!r}")
    return PARAMETRISATIONS[prediction_type]
