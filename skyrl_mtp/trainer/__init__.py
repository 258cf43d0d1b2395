"""The RL trainer: advantage estimators, policy losses, KL / entropy terms, DAPO reward shaping
and dynamic sampling (``algorithms``, ``dynamic_sampling``), and the loop that drives them."""
