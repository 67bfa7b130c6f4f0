"""The libvirt hook: what libvirt runs (program), how it is installed (install), and what a
domain declares for it (metadata).

What the hook does at each libvirt operation, and its exit codes, is told in
vhostorch.hook.program (pydoc vhostorch.hook.program). ``main`` stays importable from
here: installed hook programs call ``vhostorch.hook.main``.
"""

from vhostorch.hook.program import main

__all__ = ["main"]
