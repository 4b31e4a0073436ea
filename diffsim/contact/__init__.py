"""Surface contact between and within bodies: IPC barrier, friction and a CCD step limit.

Modules: :mod:`.distances` (closest features, mollifier), :mod:`.candidates` (surface
primitives, exclusions, broad phase), :mod:`.potential` (barrier energy and forces),
:mod:`.friction`, :mod:`.ccd` (conservative step limit on relative motion) and
:mod:`.surface_contact` (the :class:`SurfaceContact` the simulator uses), :mod:`.rest_gaps`
(the close pairs at rest and the default dhat they allow, :class:`ContactWarning`) and
:mod:`.warp_glue` (the torch side of the Warp kernels in :mod:`diffsim.kernels.contact`).
See docs/contact.md.
"""

from diffsim.contact.rest_gaps import ContactWarning, RestGaps
from diffsim.contact.surface_contact import CappedStep, SurfaceContact

__all__ = ["CappedStep", "ContactWarning", "RestGaps", "SurfaceContact"]
