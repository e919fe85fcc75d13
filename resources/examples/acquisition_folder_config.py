"""Configuration of the folder-following example (every public name is a config value)."""

# The folder the microscope writes into. A relative path is resolved against the server's
# working directory; a missing folder is created. Try it with:
#   zmqruntime simulate-acquisition acquisition --from ../shared/data/cell_migration_timelapse
folder = "acquisition"
pattern = "*.tif*"  # which files are images (case does not matter)
done_marker = "acquisition_done"  # the acquisition writes this file when it is finished
idle_timeout = 120.0  # or stop after this many seconds without a new file (None: never)
recursive = False  # also follow sub-folders (one per position, say)
poll = None  # seconds between listings to poll instead of file events (None: automatic)
skip_existing = False  # True: only files that appear after the start

# micrometres per pixel of the camera (None: unknown). When set, previews and results carry
# it (zmqruntime image metadata): scale bars, exports (OME-Zarr/OME-TIFF) and napari use it.
pixel_size = None

# segment on the frame binned n x n (the mean of each n x n block of pixels, as a camera
# bins; rows/columns left over are cropped); 1 = the full frame. Counts stay per frame, and
# mean_area is in the camera's pixels at any binning (binned areas x n²; pixels, not µm²,
# even with pixel_size set). The outlines preview is the binned frame, its pixel size x n;
# the camera preview and the max projection stay full size. A 2048x2048 frame takes the
# run ~3 s at 1, ~0.8 s at 2, ~0.45 s at 4 (2 cores, light load; ~4x that under load 10).
# The run logs it when it falls behind the camera. Keep nuclei several binned pixels
# across: the time-lapse sample's (~20 pixels across) lose up to 10 % of the counts at 2,
# up to 27 % at 4.
binning = 1

# nucleus segmentation, as in the nuclei example
smoothing_sigma = 1.0  # Gaussian smoothing before the threshold, in (binned) pixels
background_scale = 4.0  # background = Gaussian blur this many nucleus radii wide
split_touching = True  # split touching nuclei (distance-transform watershed)
split_distance = 0.5  # two nuclei centres are at least this many nucleus radii apart
min_area_fraction = 0.1  # drop objects smaller than this fraction of the typical nucleus
