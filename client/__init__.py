"""What runs in a hospital: data loading, radiomics extraction, site statistics, the ClientApp."""
