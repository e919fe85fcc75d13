"""Configuration of the simulated acquisition (every public name is a config value)."""

size = 512  # frame edge in pixels (frames are size x size uint16)
frames = 60  # number of frames to acquire
n_cells = 40  # cells in the field of view
frame_interval = 0.05  # seconds between frames, as a camera at 20 fps
seed = 0  # random seed of the simulated scene

# micrometres per pixel of the camera (None: unknown). When set, previews and results carry
# it (zmqruntime image metadata): scale bars, exports (OME-Zarr/OME-TIFF) and napari use it.
pixel_size = None
