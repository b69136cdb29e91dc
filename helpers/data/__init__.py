"""Photos and folders: opening images, the preprocessing spec, transforms, splits, names,
fixes, downloads."""
