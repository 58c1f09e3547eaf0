import { useApp } from '../context';
import { useModels } from '../models';
import { describeError } from '../format';
import { MarketplaceView } from './MarketplaceView';

export function Marketplace() {
  const { hostModels, stablecoin } = useApp();
  const models = useModels();
  return (
    <MarketplaceView
      models={models.data}
      error={models.error ? describeError(models.error) : undefined}
      hostModels={hostModels}
      stablecoin={stablecoin}
    />
  );
}
