"""Image input, the workers' business: read a reference (file or URL), decode it for a model.

One module per step: ``files`` (local paths under the allowed roots), ``fetch`` (http(s)
with the private-address guard), ``decode`` (bytes to pixels), ``load`` (a reference to
pixels), ``limits`` (what may be read) and ``errors`` (the per-image ``ImageError``).
"""

from workers.inputs.decode import decode_image
from workers.inputs.errors import ImageError
from workers.inputs.limits import ReadLimits
from workers.inputs.load import load_image, read_source

__all__ = ["ImageError", "ReadLimits", "decode_image", "load_image", "read_source"]
