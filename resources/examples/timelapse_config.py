"""Configuration of the time-lapse viewer and counter (every public name is a config value)."""

# Folder with the movie: one multi-page TIFF (axis 0 = time) or one file per frame.
# A relative path is resolved against the server's working directory. None (the default):
# the example images, from $ZMQRUNTIME_EXAMPLE_DATA, else ../shared/data (the full set, from
# the server's working directory), else the small subset that ships with zmqruntime.
input_dir = None
pattern = "*.tif"  # which files of input_dir make the movie, in name order (glob)

acquisition_rate = 5.0  # frames per second, as a camera would deliver them (0: no pause)

# micrometres per pixel of the camera (None: unknown). When set, previews and results carry
# it (zmqruntime image metadata): scale bars, exports (OME-Zarr/OME-TIFF) and napari use it.
pixel_size = None

# nucleus segmentation, as in the nuclei example
smoothing_sigma = 1.0  # Gaussian smoothing before the threshold, in pixels
background_scale = 4.0  # background = Gaussian blur this many nucleus radii wide
split_touching = True  # split touching nuclei (distance-transform watershed)
split_distance = 0.5  # two nuclei centres are at least this many nucleus radii apart
min_area_fraction = 0.1  # drop objects smaller than this fraction of the typical nucleus
