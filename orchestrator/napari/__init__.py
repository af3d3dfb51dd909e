"""The dlorch napari plugin (npe2 manifest ``napari.yaml``): a dock widget that sends the viewer's layers to the queue."""
