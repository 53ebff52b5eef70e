"""MS COCO 2014 layout (80 classes + background) and list preparation."""
