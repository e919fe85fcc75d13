"""Configuration of the plate-row analysis (every public name is a config value)."""

# Folder of field images.
# A relative path is resolved against the server's working directory. None (the default):
# the example images, from $ZMQRUNTIME_EXAMPLE_DATA, else ../shared/data (the full set, from
# the server's working directory), else the small subset that ships with zmqruntime.
input_dir = None
pattern = "*.TIF"  # which files of input_dir belong to the plate (glob)
# where the well (e.g. O07) and the field (e.g. f02) are in a file name
name_regex = r"_(?P<well>[A-Pa-p]\d{2})(?P<field>f\d{2})"

field_interval = 0.1  # seconds between streamed fields, as if acquired (0: no pause)

# micrometres per pixel of the camera (None: unknown). When set, previews and results carry
# it (zmqruntime image metadata): scale bars, exports (OME-Zarr/OME-TIFF) and napari use it.
pixel_size = None
illumination_sigma = 32.0  # smoothing of the flat field estimated from all fields, pixels
spot_sigma = 1.0  # spots: difference of Gaussians, this sigma ...
spot_background_sigma = 3.0  # ... minus this one (pixels)
spot_threshold = 6.0  # spot = filter response above this many robust SDs of the noise
min_spot_area = 3  # pixels
