"""Client models of the MoE engine. Model code holds no process group (see distributed/)."""
