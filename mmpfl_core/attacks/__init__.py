"""Privacy attacks and audits: what an adversary can learn from what the kit releases.

Membership inference (:mod:`.membership`), gradient inversion (:mod:`.gradient_inversion`) and the
one-run DP audit (:mod:`.audit`). These modules attack the mechanisms in :mod:`mmpfl_core.privacy`;
the privacy package never imports them (the mechanism never knows its attacker).
"""
