"""Linear state probes: how much of the true state can be read linearly from what a policy carries.

Closed-form ridge regression from features (Perceiver latents, an SB3 features extractor's output, an LSTM's
hidden state) to the privileged state, fit on some evaluation episodes and scored on others (R² per sensor).
Split by episode, never by step: consecutive steps of one episode are nearly identical, so a step-level split
would score memorisation. The ridge penalty is chosen on a held-out episode of the fitting half.
"""

from __future__ import annotations

import numpy as np

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
MIN_EPISODES = 4


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float, dual: bool | None = None):
    """(predict function) of ridge regression on standardised x with an intercept; x (N, F), y (N, S).

    Uses the dual form when there are more features than samples (Perceiver latents: 2048 features); `dual`
    forces one form (the two are the same estimator: X^T (X X^T + aI)^-1 = (X^T X + aI)^-1 X^T)."""
    x_mean, x_std = x.mean(0), x.std(0) + 1e-6
    y_mean = y.mean(0)
    xs, yc = (x - x_mean) / x_std, y - y_mean
    if dual is None:
        dual = xs.shape[1] > xs.shape[0]
    if not dual:
        weights = np.linalg.solve(xs.T @ xs + alpha * np.eye(xs.shape[1]), xs.T @ yc)
    else:
        weights = xs.T @ np.linalg.solve(xs @ xs.T + alpha * np.eye(xs.shape[0]), yc)
    return lambda new: ((new - x_mean) / x_std) @ weights + y_mean


def r2(prediction: np.ndarray, target: np.ndarray) -> float:
    """R² = 1 - SSE / SST over all the columns given (a constant target scores 0 when predicted exactly)."""
    error = ((prediction - target) ** 2).sum()
    spread = ((target - target.mean(0)) ** 2).sum()
    return float(1.0 - error / spread) if spread > 1e-12 else 0.0


def r2_per_sensor(prediction: np.ndarray, target: np.ndarray, layout: dict[str, tuple[int, int]]) -> dict:
    """`r2` over each sensor's dimensions."""
    return {
        name: r2(prediction[:, start:stop], target[:, start:stop]) for name, (start, stop) in layout.items()
    }


def state_probe(
    features: list[np.ndarray],
    states: list[np.ndarray],
    layout: dict[str, tuple[int, int]],
    alphas: tuple[float, ...] = ALPHAS,
    parts: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """R² per sensor (and their mean under 'mean') of a ridge probe from features to state; then, by the same
    probe, R² of each of `parts` (name -> state column indices, e.g. `envs.DMCEnv.state_parts`: a sensor's sensed
    and unsensed dimensions), which the mean leaves out.

    features / states: one (T_i, F) / (T_i, S) array per episode. The first half of the episodes fits the probe
    (its last episode chooses the penalty, then the whole half refits), the second half scores it."""
    if len(features) != len(states) or len(features) < MIN_EPISODES:
        raise ValueError(
            f"a state probe needs at least {MIN_EPISODES} episodes of features and states, got "
            f"{len(features)} and {len(states)}"
        )
    half = len(features) // 2
    fit_x, fit_y = features[:half], states[:half]
    test_x, test_y = np.concatenate(features[half:]), np.concatenate(states[half:])
    train_x, train_y = np.concatenate(fit_x[:-1]), np.concatenate(fit_y[:-1])

    def score(alpha):
        predict = ridge_fit(train_x, train_y, alpha)
        return np.mean(list(r2_per_sensor(predict(fit_x[-1]), fit_y[-1], layout).values()))

    alpha = max(alphas, key=score)
    predict = ridge_fit(np.concatenate(fit_x), np.concatenate(fit_y), alpha)
    prediction = predict(test_x)
    scores = r2_per_sensor(prediction, test_y, layout)
    scores["mean"] = float(np.mean(list(scores.values())))
    for name, columns in (parts or {}).items():
        scores[name] = r2(prediction[:, columns], test_y[:, columns])
    return scores
