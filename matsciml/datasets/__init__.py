"""Structure data: readers, the embedded devset, transforms to periodic graphs, collate."""
