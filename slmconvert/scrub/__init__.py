"""Stage S2: PII/PHI/secret scrubbing."""


def scrub_invocations(invocations, config, workspace, progress=None, scrubber=None, template_values=()):
    from slmconvert.progress import NULL_PROGRESS
    from slmconvert.scrub.engine import scrub_invocations as _impl

    return _impl(invocations, config, workspace, progress=progress or NULL_PROGRESS, scrubber=scrubber,
                 template_values=template_values)
