"""Configuration of the nucleus counter (every public name is a config value)."""

# Folder of images, one field per file.
# A relative path is resolved against the server's working directory. None (the default):
# the example images, from $ZMQRUNTIME_EXAMPLE_DATA, else ../shared/data (the full set, from
# the server's working directory), else the small subset that ships with zmqruntime.
input_dir = None
pattern = "*.png"  # which files of input_dir to count (glob), e.g. "*.tif"

# micrometres per pixel of the camera (None: unknown). When set, previews and results carry
# it (zmqruntime image metadata): scale bars, exports (OME-Zarr/OME-TIFF) and napari use it.
pixel_size = None

smoothing_sigma = 1.0  # Gaussian smoothing before the threshold, in pixels
background_scale = 4.0  # background = Gaussian blur this many nucleus radii wide
split_touching = True  # split touching nuclei (distance-transform watershed)
split_distance = 0.5  # two nuclei centres are at least this many nucleus radii apart
min_area_fraction = 0.1  # drop objects smaller than this fraction of the typical nucleus
