"""Stage 1, trace and annotate: the graph IR (networkx, traced from the supernet), the pass contract
and manager, and the front end that traces a supernet and annotates it for every later stage."""
