"""The Hungarian matcher and the detection criterion (unweighted named terms, one weight map)."""
