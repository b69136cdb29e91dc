"""Photos and folders: finding and opening images, the preprocessing spec, transforms, splits, names, fixes, downloads."""
