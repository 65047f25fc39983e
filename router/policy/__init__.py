"""The policy file: scheduling, placement, per-model copies and versions, priority classes.

Typed and frozen, parsed and validated once. A file looks like (see examples/policy.yaml):

    scheduling:            # as router.plugins.registry.build_profile takes; sections left out
      scorers:             # take the default profile's
        - {type: model-affinity, weight: 3}
    placement:             # router.placement.PlacementPolicy's fields, plus:
      interval_s: 1.0                      # controller tick
      enabled: true
      default_per_copy_capacity_rps: 50
      default_memory_bytes: 0              # footprint when neither measured nor declared
    models:                                #   (0 = such a model is never placed)
      codegen:
        min_copies: 1
        max_copies: 3                      # absent or null: as many as there are instances
        per_copy_capacity_rps: 40          # absent: placement.default_per_copy_capacity_rps
        memory_bytes: 67108864             # replaces the declared footprint (not a measured one)
        versions:
          split: {"1": 90, "2": 10}        # relative weights > 0; versions are Triton's numbers
          sticky_header: x-user-id         # the hash of this header's value picks the arm
          header_rules:
            - {header: x-canary, value: "1", version: "2"}
        prefix_routing:                    # route by the prompt's prefix (absent: off)
          prompt_input: PROMPT             # the BYTES input holding the prompt (required)
          block_bytes: 64                  # the key covers the first
          max_blocks: 16                   #   block_bytes x max_blocks bytes
          min_blocks: 1                    # fewer full blocks: no key, the usual pick
          epsilon: 0.25                    # a holder takes at most ceil(1.25 x mean) load
    demand:                                # how demand is measured (router.demand.DemandWindows)
      bucket_s: 1.0
      span_s: 300                          # history kept; every window must fit in it
      short_window_s: 60                   # the rate copies are sized for
      long_window_s: 300
      fit_window_s: 60                     # the trend behind the forecast
      horizon_s: 30                        # how far ahead the forecast looks
      recent_window_s: 6                   # a sudden rise and the queue count within this
    priority_classes:                      # name -> Triton priority level (1 = highest)
      high: {triton_priority: 1}
      low: {triton_priority: 2, sheddable: true}
    default_priority_class: low
    sessions:                              # session affinity (sidecars; pointsman/sessions.py)
      header: x-session-id                 # the header naming a session; "" turns it off
      max_in_flight: 8                     # a holder with this many of one sidecar's requests
      move_ttl_s: 600                      #   in flight is saturated: its sessions move, once

Every section may be left out: `{}` is the default policy (an empty file is refused, since it
is also what a writer leaves half-way). A key given twice is refused. Every error is a
ConfigError whose message starts with the field's path, e.g.
`models.codegen.versions.split["2"]: weight must be > 0`.

    model.py   Policy, ModelPolicy (and the kernel's PriorityClass): the data model
    parser.py  text or plain data -> Policy, through the one config reader (pointsman/config/)
    store.py   PolicyStore: the running policy, reloaded on request and when the file changes
"""

from pointsman.versions import HeaderRule, VersionRules, select_version
from router.policy.model import DEFAULT_SOURCE, ModelPolicy, Policy, PriorityClass
from router.policy.parser import default_policy, parse_policy, parse_policy_file, parse_policy_text
from router.policy.store import PolicyCheck, PolicyListener, PolicyStore, load_policy

__all__ = [
    "DEFAULT_SOURCE",
    "HeaderRule",
    "ModelPolicy",
    "Policy",
    "PolicyCheck",
    "PolicyListener",
    "PolicyStore",
    "PriorityClass",
    "VersionRules",
    "default_policy",
    "load_policy",
    "parse_policy",
    "parse_policy_file",
    "parse_policy_text",
    "select_version",
]
