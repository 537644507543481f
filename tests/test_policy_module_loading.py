"""Which copy of a dotted policy module attach and upgrade use.

Attach imports a dotted module once: attached to several apps, its module-level state (a
host-wide quota, a registry) is one. Upgrade runs the code now on disk under a fresh name,
and attaches after it get that upgraded code too.
"""
from __future__ import annotations

import sys
import textwrap

from mrpcd.policies.base import load_policy_module

MODULE = textwrap.dedent('''
    from mrpcd.policies.base import Policy
    SHARED = {{"calls": 0}}

    class HostQuota(Policy):
        name = "hostquota_{tag}"
        version = "{version}"

    POLICY = HostQuota
''')


def test_attach_shares_one_module_and_upgrade_runs_new_code(tmp_path, monkeypatch):
    tag = tmp_path.name.replace("-", "_")
    mod = f"hostquota_{tag}"
    (tmp_path / f"{mod}.py").write_text(MODULE.format(tag=tag, version="1"))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        classes = [load_policy_module(mod) for _ in range(3)]
        assert len(set(classes)) == 1 and classes[0].version == "1"
        (tmp_path / f"{mod}.py").write_text(MODULE.format(tag=tag, version="2"))
        upgraded = load_policy_module(mod, fresh=True)
        assert upgraded.version == "2"
        assert load_policy_module(mod) is upgraded  # a later attach gets the upgraded code
        assert classes[0].version == "1"  # the running version is left as it was
    finally:
        sys.modules.pop(mod, None)
