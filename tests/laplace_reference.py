"""An independent reference for the Laplace start of both backends' AutoFlow tests."""

import numpy as np
from scipy import optimize, stats


def location_scale_mode_and_cov(data):
    """Mode and inverse Hessian of location_scale's log joint in (mu, log sigma), by scipy
    on the log-density written out by hand: mu ~ N(0, 2), sigma ~ HalfNormal(1), data ~ N(mu, sigma)."""

    def neg_log_joint(x):
        mu, log_sigma = x
        sigma = np.exp(log_sigma)
        return -(
            stats.norm.logpdf(mu, 0.0, 2.0)
            + stats.halfnorm.logpdf(sigma)
            + log_sigma
            + stats.norm.logpdf(data, mu, sigma).sum()
        )

    mode = optimize.minimize(neg_log_joint, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    eps = 1e-4  # central second differences: error O(eps^2)
    h = np.array(
        [
            [
                (
                    neg_log_joint(mode + eps * (e1 + e2))
                    - neg_log_joint(mode + eps * (e1 - e2))
                    - neg_log_joint(mode - eps * (e1 - e2))
                    + neg_log_joint(mode - eps * (e1 + e2))
                )
                / (4 * eps**2)
                for e2 in np.eye(2)
            ]
            for e1 in np.eye(2)
        ]
    )
    return mode, np.linalg.inv(h)
