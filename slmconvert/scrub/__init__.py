"""Stage S2: PII/PHI/secret scrubbing."""


def scrub_invocations(invocations, config, workspace, progress=None):
    from slmconvert.scrub.engine import scrub_invocations as _impl

    return _impl(invocations, config, workspace, progress=progress)
