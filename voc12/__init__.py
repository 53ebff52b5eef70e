"""PASCAL VOC 2012 layout, list preparation, the synthetic VOC-layout generator and datasets."""
