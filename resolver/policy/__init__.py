"""Per-device and per-group policy: the model, the precedence, the stores, and each worker's hot copy.

    model      site documents (subscriber, groups, devices, policies, schedules) and their validation
    effective  precedence, pauses and schedules: the policy in force for a client at a moment
    runtime    the effective Policy the query path reads, and its Verdicts
    store      Redis (shared by every node) and the embedded file (one box)
    service    the validated write API (the CLI and the admin API call it)
    directory  each worker's bounded, change-following copy of what it uses
"""
