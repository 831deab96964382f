"""Rewards for tests of the RL stage (rl.reward=tests.support.rewards:NAME): functions of the sampled text that vary
within a group, so that every group has advantages and a gradient (the toy task's checker leaves most groups of an
untrained student at reward 0)."""


def characters_mod_3(texts: list[str], examples: list) -> list[float]:
    """The sum of the text's character codes modulo 3: any change of a token changes it with probability 2/3."""
    return [float(sum(map(ord, t)) % 3) for t in texts]
