//! Images: layer conversion into EROFS and (later) registries and the chunked format.
