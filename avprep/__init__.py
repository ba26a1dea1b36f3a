"""Audio-visual preprocessing: media IO, face landmarks, mouth-ROI alignment."""
